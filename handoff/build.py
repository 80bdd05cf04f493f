"""Compile the BPF programs (clang -target bpf); ``python -m handoff.build``.

The objects go to handoff/bpf/build/ and are rebuilt when a source or any
header (arr_handoff.h and the headers by role it includes) is newer. The Makefile's ``bpf`` target and the loaders both
come here, so there is one set of compiler flags.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "bpf"
BUILD_DIR = SOURCE_DIR / "build"
PROGRAMS = ("router", "target")


def _include_dirs() -> list[str]:
    # asm/ headers live under the multiarch include dir on Debian.
    machine = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    candidates = [f"/usr/include/{machine}"] if machine else []
    return [f"-I{d}" for d in candidates if Path(d).is_dir()]


def object_path(name: str) -> Path:
    """The compiled object for ``name`` (router or target), built if stale."""
    if name not in PROGRAMS:
        raise ValueError(f"no BPF program {name!r} (have: {', '.join(PROGRAMS)})")
    source = SOURCE_DIR / f"{name}.bpf.c"
    target = BUILD_DIR / f"{name}.bpf.o"
    # Every header counts: arr_handoff.h includes the others by role.
    newest = max(path.stat().st_mtime for path in [source, *SOURCE_DIR.glob("*.h")])
    if not target.exists() or target.stat().st_mtime < newest:
        compile_program(source, target)
    return target


def compile_program(source: Path, target: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError("clang is needed to build the BPF programs (apt-get install clang libbpf-dev)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    cmd = [clang, "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
           *_include_dirs(), "-c", str(source), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr}")
    tmp.replace(target)


def main() -> int:
    for name in PROGRAMS:
        print(object_path(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
