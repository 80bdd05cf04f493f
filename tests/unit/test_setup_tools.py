"""Every program the test bed, the tests, the demo and the benchmarks run is one
that ``scripts/setup.sh`` installs (``make test`` must pass on a machine where
setup never ran: a network test once ran ``wrk``, which setup installed only
for the benchmarks).

The commands are read from the sources: the first element of every argv list
literal handed to a process runner (``exec``, ``popen``, ``run``, ``Popen``,
``check_output``, ``version_of``) or bound to ``argv``/``cmd``. The tools are
read from setup.sh's ``for tool in NAME:PACKAGE ...`` lists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [*sorted((ROOT / "arr").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
           *sorted((ROOT / "benchmarks").rglob("*.py"))]

ALWAYS_THERE = {"sleep", "true", "false", "sh", "python3", "git"}
"""Part of every machine this runs on (coreutils, the Python that runs the tests,
the checkout's own git)."""
BENCH_ONLY = {"haproxy"}
"""Installed by ``setup.sh --bench``, run only by the benchmark harness."""

RUNNER = re.compile(r"\b(?:exec|popen|run|Popen|check_output|check_call|version_of)\(\s*"
                    r"(?:[\w.]+\s*,\s*)?\[\s*\"([^\"]+)\"")
ASSIGNED = re.compile(r"\b(?:argv|cmd|command)\s*=\s*\[\s*\"([^\"]+)\"")
SETUP_LIST = re.compile(r"for tool in ((?:[\w.+-]+:[\w.+-]+\s*\\?\s*)+);")


def commands_run(path: Path) -> set[str]:
    text = path.read_text()
    return {Path(name).name for name in RUNNER.findall(text) + ASSIGNED.findall(text)}


def setup_tools(script: str) -> tuple[set[str], set[str]]:
    """(tools setup always installs, tools only --bench installs)."""
    always: set[str] = set()
    bench: set[str] = set()
    for match in SETUP_LIST.finditer(script):
        names = {item.split(":")[0] for item in match.group(1).split() if ":" in item}
        preceding = script[:match.start()].split("\n")[-3:]
        (bench if any('"$bench" = 1' in line for line in preceding) else always).update(names)
    return always, bench


def test_the_scan_finds_what_it_must():
    """The patterns see the runners the test bed uses (else the check is empty)."""
    found = set().union(*(commands_run(p) for p in SOURCES))
    assert {"curl", "ip", "nft", "nstat", "ss", "ethtool", "wrk", "sysctl"} <= found, found


def test_every_program_run_is_installed_by_setup():
    always, bench = setup_tools((ROOT / "scripts" / "setup.sh").read_text())
    assert {"nginx", "curl", "wrk", "clang", "bpftool"} <= always, always
    assert BENCH_ONLY <= bench
    missing = {}
    for path in SOURCES:
        extra = commands_run(path) - always - ALWAYS_THERE
        if path.is_relative_to(ROOT / "benchmarks"):
            extra -= bench
        if extra:
            missing[str(path.relative_to(ROOT))] = sorted(extra)
    assert not missing, f"programs run but not installed by scripts/setup.sh: {missing}"
