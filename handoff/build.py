"""The BPF programs' objects: shipped prebuilt, or compiled (clang -target bpf).

``python -m handoff.build`` compiles them into handoff/bpf/build/; a wheel
carries them there too (setup.py compiles them at build time), so an
installed arr needs no compiler. Which object is current is decided by
content, not by file times (an installed package's times are the install's):
``build/sources.sha256`` records the hash of the sources and headers the
objects were built from. When the sources present do not match it (an edited
checkout, or a package whose objects are missing), the objects are compiled
again: into handoff/bpf/build/ in a checkout (a pyproject.toml beside the
package), else into a cache directory (``ARR_BPF_CACHE``, default
``$XDG_CACHE_HOME/arr/bpf`` or ``~/.cache/arr/bpf``), one subdirectory per
source hash, never into site-packages.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "bpf"
BUILD_DIR = SOURCE_DIR / "build"
PROGRAMS = ("router", "target")
MANIFEST = "sources.sha256"


def source_files(source_dir: Path | None = None) -> list[Path]:
    """Every file an object depends on: the programs and the headers by role
    that arr_handoff.h includes."""
    source_dir = source_dir or SOURCE_DIR
    return sorted([*source_dir.glob("*.bpf.c"), *source_dir.glob("*.h")])


def sources_digest(source_dir: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in source_files(source_dir):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_dir() -> Path:
    explicit = os.environ.get("ARR_BPF_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "arr" / "bpf"


def _current(build_dir: Path, digest: str) -> bool:
    manifest = build_dir / MANIFEST
    try:
        recorded = manifest.read_text().strip()
    except OSError:
        return False
    return recorded == digest and all((build_dir / f"{name}.bpf.o").is_file() for name in PROGRAMS)


def in_checkout() -> bool:
    """Running from a source tree (not from an installed package)."""
    return (SOURCE_DIR.parents[1] / "pyproject.toml").is_file()


def object_path(name: str) -> Path:
    """The current object for ``name`` (router or target), compiled if none is."""
    if name not in PROGRAMS:
        raise ValueError(f"no BPF program {name!r} (have: {', '.join(PROGRAMS)})")
    digest = sources_digest()
    if _current(BUILD_DIR, digest):
        return BUILD_DIR / f"{name}.bpf.o"
    build_dir = BUILD_DIR if in_checkout() else cache_dir() / digest[:16]
    if not _current(build_dir, digest):
        build_all(build_dir)
    return build_dir / f"{name}.bpf.o"


def build_all(build_dir: Path, source_dir: Path | None = None) -> None:
    """Compile every program from SOURCE_DIR into BUILD_DIR, then record the
    sources' hash (last, so a half-built directory is never taken as current)."""
    source_dir = source_dir or SOURCE_DIR
    for name in PROGRAMS:
        compile_program(source_dir / f"{name}.bpf.c", build_dir / f"{name}.bpf.o")
    (build_dir / MANIFEST).write_text(sources_digest(source_dir) + "\n")


def _include_dirs() -> list[str]:
    # asm/ headers live under the multiarch include dir on Debian.
    machine = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    candidates = [f"/usr/include/{machine}"] if machine else []
    return [f"-I{d}" for d in candidates if Path(d).is_dir()]


def compile_program(source: Path, target: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError(
            f"the BPF object {target.name} has to be compiled (its sources differ from the shipped "
            "objects, or none were shipped) and clang is not installed: install clang and "
            "libbpf-dev, or install arr from a wheel, which carries the objects")
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
