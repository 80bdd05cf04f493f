"""``scripts/setup.sh --bench`` installs what the benchmark's profile needs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_setup_bench_installs_py_spy_into_the_venv_with_pip():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    block = re.search(r'if \[ "\$bench" = 1 \] && \[ ! -x \.venv/bin/py-spy \]; then\n(.*?)\nfi', script, re.S)
    assert block, "setup.sh --bench must install py-spy when .venv/bin/py-spy is missing"
    assert re.search(r"\.venv/bin/python -m pip install .*\bpy-spy\b", block.group(1))


def test_profile_looks_for_py_spy_where_setup_puts_it():
    run = (ROOT / "benchmarks" / "run.py").read_text()
    assert 'Path(sys.executable).parent / "py-spy"' in run
    assert "setup.sh --bench" in run  # the message when it is missing says how to get it
