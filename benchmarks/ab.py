"""A/B of the keep-alive routing goals (8 and 9): a base commit against this
checkout, run in alternation on the same test bed.

    python -m benchmarks.ab --base HEAD~1                 # 3 rounds, arr-nat
    python -m benchmarks.ab --base 2a4fd55 --rounds 5 --out /tmp/ab

Why: on this VM the run-to-run spread of the router's CPU per request is
larger than most changes on the request path (a first handoff measured 0.75
to 1.33 ms on two mornings, benchmarks/RESULTS.md). Comparing a run of today
with a figure of yesterday measures the VM. Here each round runs both trees
once, minutes apart, alternating which goes first, and the report pairs
them round by round.

Each run is ``python -m benchmarks --systems arr-nat --tests rehandoff
--runs 1 --no-memory --sustain 0 --profile 0`` with the tree's own code
(PYTHONPATH; the test bed starts the router and agents from the tree that
imported it, arr/testbed/router.py). The base tree is a detached git
worktree of BASE, built the way scripts/setup.sh builds (the C accelerator
in place, the BPF objects) and removed at the end; its benchmarks/ is this
checkout's, so that one harness measures both.

Pure parts (``round_figures``, ``render``): tests/unit/test_bench_ab.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from benchmarks.stats import percentile, rehandoff_summary

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_ARGS = ("--systems", "arr-nat", "--tests", "rehandoff", "--runs", "1", "--no-memory",
              "--sustain", "0", "--profile", "0")
LABELS = ("base", "change")


@dataclass(frozen=True)
class RoundFigures:
    """One run of one tree: router CPU per request of each window, and the goals' ratios."""

    label: str
    round: int
    first_ms: float
    same_ms: float
    other_ms: float
    agents_first_ms: float | None
    agents_same_ms: float | None
    agents_other_ms: float | None
    user_other_x: float | None = None
    """Other over first on the router's user time alone (a diagnostic:
    ``benchmarks.stats.user_seconds_from_stat``)."""

    @property
    def same_x(self) -> float:
        return self.same_ms / self.first_ms

    @property
    def other_x(self) -> float:
        return self.other_ms / self.first_ms


def _median_of(summary: Mapping | None) -> float | None:
    return None if not summary else summary.get("median")


def round_figures(label: str, round_no: int, results: Mapping) -> RoundFigures:
    """The figures of one benchmark results.json (its arr-nat runs). Raises
    ValueError, naming the run, when a window has no figure (the run failed:
    its errors are in that results.json)."""
    runs = ((results.get("raw") or {}).get("arr-nat") or {}).get("runs") or []
    summary = rehandoff_summary(runs) or {}
    cpu = {w: _median_of((summary.get(w) or {}).get("router_cpu_per_request_ms")) for w in ("first", "same", "other")}
    missing = [w for w, v in cpu.items() if not v]
    if missing:
        raise ValueError(f"{label} round {round_no}: no router CPU figure for window(s) {', '.join(missing)}"
                         f" (errors: {results.get('errors') or 'none recorded'})")
    agents = {w: _median_of((summary.get(w) or {}).get("agent_cpu_per_request_ms")) for w in ("first", "same", "other")}
    return RoundFigures(label, round_no, cpu["first"], cpu["same"], cpu["other"],
                        agents["first"], agents["same"], agents["other"],
                        _median_of(summary.get("other_to_first_user")))


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return percentile(known, 0.5) if known else None


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def render(rows: Sequence[RoundFigures], base: str, change: str) -> str:
    """A markdown table: one line per round and tree, then each tree's medians."""
    out = [f"A/B of the keep-alive routing goals: base {base}, change {change}; router CPU per request "
           "(ms) and each window over the first-handoff window of the same run (goals 8: same <= 0.5 x, "
           "9: other <= 1 x)", "",
           "| round | tree | first ms | same ms | other ms | same x | other x | user other x "
           "| agents first/same/other ms |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---|"]

    def line(round_text: str, label: str, figures: Sequence[RoundFigures]) -> str:
        first = _median([f.first_ms for f in figures])
        same = _median([f.same_ms for f in figures])
        other = _median([f.other_ms for f in figures])
        agents = "/".join(_cell(_median([getattr(f, f"agents_{w}_ms") for f in figures]), "{:.3f}")
                          for w in ("first", "same", "other"))
        return (f"| {round_text} | {label} | {_cell(first, '{:.3f}')} | {_cell(same, '{:.3f}')} | "
                f"{_cell(other, '{:.3f}')} | {_cell(_median([f.same_x for f in figures]), '{:.2f}')} | "
                f"{_cell(_median([f.other_x for f in figures]), '{:.2f}')} | "
                f"{_cell(_median([f.user_other_x for f in figures]), '{:.2f}')} | {agents} |")

    for row in sorted(rows, key=lambda r: (r.round, LABELS.index(r.label))):
        out.append(line(str(row.round), row.label, [row]))
    for label in LABELS:
        mine = [r for r in rows if r.label == label]
        if mine:
            out.append(line("median", label, mine))
    out.append("")
    out.append("Ratios are medians of each run's own ratio (paired within a run), not ratios of medians. "
               "\"user other x\": the same ratio on the router's user time alone, without the kernel work "
               "charged to it (a diagnostic; the goal is on its whole CPU).")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- I/O

def _git(*args: str, cwd: Path = PROJECT_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def build_tree(commit: str, where: Path) -> None:
    """A detached worktree of COMMIT at WHERE, built, with this checkout's
    benchmarks/ in place of its own: both trees are measured by one harness
    (a base older than a change of the harness would otherwise be measured
    another way), each on its own code (arr/, handoff/)."""
    if where.exists():
        _remove_tree(where)
    _git("worktree", "add", "--detach", str(where), commit)
    shutil.rmtree(where / "benchmarks")
    shutil.copytree(PROJECT_ROOT / "benchmarks", where / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "handoff.build"], cwd=where, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(where)})


def _remove_tree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=PROJECT_ROOT,
                   capture_output=True)
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=PROJECT_ROOT, capture_output=True)


def run_tree(tree: Path, out: Path, seconds: int | None, rounds: int | None = None,
             connections: int | None = None) -> Mapping:
    argv = [sys.executable, "-m", "benchmarks", *BENCH_ARGS, "--out", str(out)]
    if seconds is not None:
        argv += ["--rehandoff-seconds", str(seconds)]
    if rounds is not None:
        argv += ["--rehandoff-rounds", str(rounds)]
    if connections is not None:
        argv += ["--rehandoff-connections", str(connections)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.log", "w") as log:
        subprocess.run(argv, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, stdout=log,
                       stderr=subprocess.STDOUT, check=False)
    results = out / "results.json"
    if not results.is_file():
        raise RuntimeError(f"{tree}: the benchmark wrote no {results} (see {out / 'bench.log'})")
    return json.loads(results.read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare this checkout with (any git revision)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each one run of each tree (default 3)")
    p.add_argument("--rehandoff-seconds", type=int, help="each window's length (the benchmark's default: 2)")
    p.add_argument("--rehandoff-rounds", type=int,
                   help="interleaved rounds of the three windows in each run (the benchmark's default: 4)")
    p.add_argument("--rehandoff-connections", type=int,
                   help="keep-alive connections of each window (the benchmark's default: 8)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ab"), help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print("arr bench ab: --rounds must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("arr bench ab: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_tree = out / "base-tree"
    try:
        base_commit = _git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"arr bench ab: --base {args.base!r} names no commit of this repository", file=sys.stderr)
        return 2
    try:
        build_tree(base_commit, base_tree)
    except subprocess.CalledProcessError as exc:
        print(f"arr bench ab: could not build {args.base}: {exc.stderr or exc} (setup.py needs the venv's "
              "setuptools >= 77: bash scripts/setup.sh --bench)", file=sys.stderr)
        _remove_tree(base_tree)
        return 2
    dirty = " (+ uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    change = f"{_git('rev-parse', '--short', 'HEAD')}{dirty}"
    trees = {"base": base_tree, "change": PROJECT_ROOT}
    rows: list[RoundFigures] = []
    errors: list[str] = []
    started = time.time()
    try:
        for round_no in range(1, args.rounds + 1):
            order = LABELS if round_no % 2 else tuple(reversed(LABELS))  # drift cancels out
            for label in order:
                print(f"[{time.strftime('%H:%M:%S')}] round {round_no}/{args.rounds}: {label}", file=sys.stderr)
                try:
                    results = run_tree(trees[label], out / f"round{round_no}-{label}", args.rehandoff_seconds,
                                       args.rehandoff_rounds, args.rehandoff_connections)
                    rows.append(round_figures(label, round_no, results))
                except (RuntimeError, ValueError) as exc:
                    errors.append(str(exc))
                    print(f"  {exc}", file=sys.stderr)
    finally:
        _remove_tree(base_tree)
    table = render(rows, base_commit[:7], change)
    if errors:
        table += "\nErrors:\n" + "".join(f"* {e}\n" for e in errors)
    (out / "ab.md").write_text(table)
    (out / "ab.json").write_text(json.dumps({"base": base_commit, "change": change,
                                             "duration_s": round(time.time() - started, 1),
                                             "rows": [asdict(r) for r in rows], "errors": errors}, indent=1))
    print(table)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
