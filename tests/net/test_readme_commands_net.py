"""Every `arr` command the README prints, run as printed against a running
nat cluster: from a directory holding that cluster's router.toml and
agent.toml, TARGET being one of its targets, the admin socket given by
ARR_ADMIN_SOCKET (so that the test's router need not own /run/arr/admin.sock).
`arr serve` and `arr agent` are what the test bed itself runs; `arr bench`
and `arr demo` have tests of their own."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from arr.testbed.router import handoff_cluster

pytestmark = pytest.mark.net

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "unit"))
from test_readme_configs import readme_commands  # noqa: E402

STARTED_BY_THE_TEST_BED = ("arr serve ", "arr agent ")


def test_every_readme_command_runs_as_printed(cluster):
    c = cluster(targets=2, files={"1m": 1 << 20})
    commands = readme_commands()
    assert any(line.startswith("arr drain") for line in commands)
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", router.url + c.files["1m"].url_path])
        here = c.workdir / "readme"
        here.mkdir()
        (here / "router.toml").symlink_to(c.workdir / "router.toml")
        (here / "agent.toml").symlink_to(agents[0].log_path.parent / f"agent-{c.targets[0].name}.toml")
        env = {"PYTHONPATH": str(PROJECT_ROOT), "ARR_ADMIN_SOCKET": router.config["router"]["admin_socket"]}
        ran = 0
        for line in commands:
            if line.startswith(STARTED_BY_THE_TEST_BED):
                continue
            argv = [a.replace("TARGET", c.targets[0].name) for a in shlex.split(line)[1:]]
            host = c.targets[0] if "--side agent" in line else c.router
            cp = c.exec(host, ["sh", "-c", f"cd {shlex.quote(str(here))} && "
                               + shlex.join([sys.executable, "-m", "arr", *argv])], check=False, env=env)
            assert cp.returncode == 0, f"{line!r} failed ({cp.returncode}): {cp.stderr}"
            assert "Traceback" not in cp.stderr, line
            ran += 1
        assert ran >= 13
        # The README's `arr conns` on the router found this router's maps (its owner record).
        listed = c.exec(c.router, [sys.executable, "-m", "arr", "conns", "-s", "--json"], env=env).stdout
        assert '"connections"' in listed
