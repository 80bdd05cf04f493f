"""arr on every supported Python: 3.11 (the main .venv, which runs everything
else), 3.12 and 3.13 (``.venv-3.12`` and ``.venv-3.13``, made by
``scripts/setup.sh --pythons``, which ``make test`` runs, from pyenv's
interpreters: Debian bookworm packages neither).

For 3.12 and 3.13: the whole unit suite, run by that interpreter. For all three:
a nat cluster whose router and agents that interpreter runs: downloads through
the router (SHA-256 checked, handed off, no fallback), then the agents stopped
while the router is connected to them and the router stopped while clients are
connected to it, each asserted to exit on its own (SIGTERM, exit status 0)
within its drain time. On Python 3.12.1+ ``asyncio.Server.wait_closed()``
waits for every open connection: a server that awaits it before closing its
connections never stops (the agent with a router connected did not). uvloop's
Server does not wait so (uvloop 0.23), which hid it where uvloop is installed:
so on 3.12 and 3.13 the cluster also runs once on the stock asyncio loop (the
processes start with uvloop hidden from imports, arr's fallback when uvloop is
missing).

A missing interpreter or venv fails these tests with what to do; they are never
skipped.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arr.testbed import Cluster
from arr.testbed.files import FileInfo
from arr.testbed.router import (CHECKOUT, AgentProcess, ArrInstall, RouterProcess, handoff_cluster,
                                wait_for)

pytestmark = pytest.mark.net

MiB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[2]
OTHER_VERSIONS = ("3.12", "3.13")
"""The versions with a venv of their own (3.11 is the main .venv's)."""
MAIN_VERSION = "3.11"

UNIT_SUITE_TIMEOUT = 900.0
"""The whole unit suite takes 1.5 to 2 minutes on a 2-vCPU VM; a hang (the
suite hung on 3.12.1+ once, see tests/conftest.py's Upstream.stop) ends here,
with faulthandler's tracebacks of where it hung in the failure."""

ROUTER_DRAIN = 2.0
"""router.drain_timeout of the cluster below: a client with half a request
head keeps the router draining that long."""
STOP_SLACK = 3.0
"""What a process may take beyond its drain time to exit (interpreter teardown,
closing maps, a loaded machine)."""


def agent_drain_time() -> float:
    """How long the agent's stop may wait for its control connections:
    ControlServer.stop() bounds its wait for the connection tasks and for the
    listener by ``stop_timeout`` each."""
    from handoff.control.channel import ControlServer

    default = inspect.signature(ControlServer.__init__).parameters.get("stop_timeout")
    per_wait = default.default if default is not None and isinstance(default.default, (int, float)) else 1.0
    return 2 * per_wait


def venv_python(version: str) -> Path:
    """The interpreter of ``.venv-VERSION``, checked to be VERSION with arr and
    its compiled accelerator importable; a clear failure if not."""
    python = PROJECT_ROOT / f".venv-{version}" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python.relative_to(PROJECT_ROOT)} is missing: `bash scripts/setup.sh --pythons` makes it "
                    f"from pyenv's Python {version} (`make test` runs it; it says why when it cannot, e.g. "
                    f"no Python {version} under `pyenv root`/versions: `pyenv install {version}`)", pytrace=False)
    code = ("import sys, arr, handoff.fastpath as f; "
            "print('%d.%d' % sys.version_info[:2], f.COMPILED, arr.__file__)")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60,
                            cwd="/", env=_child_env())
    if result.returncode != 0:
        pytest.fail(f"{python} cannot import arr (run `bash scripts/setup.sh --pythons`):\n{result.stderr}",
                    pytrace=False)
    got, compiled, where = result.stdout.split()
    assert got == version, f"{python} is Python {got}, not {version}"
    assert compiled == "True", f"{python}: handoff._fastpath not built for {version} (scripts/setup.sh --pythons)"
    assert where.startswith(str(PROJECT_ROOT)), f"{python} imports arr from {where}, not from this checkout"
    return python


def _child_env() -> dict[str, str]:
    """This environment minus what would point another interpreter at this one's packages."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST")}


@pytest.mark.parametrize("version", OTHER_VERSIONS)
def test_the_unit_suite_passes(version):
    python = venv_python(version)
    argv = [str(python), "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-o", "faulthandler_timeout=120", "tests/unit"]
    started = time.monotonic()
    try:
        result = subprocess.run(argv, cwd=PROJECT_ROOT, env=_child_env(), capture_output=True, text=True,
                                timeout=UNIT_SUITE_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"the unit suite on Python {version} did not end within {UNIT_SUITE_TIMEOUT:.0f}s "
                    f"(a hang?):\n{out[-6000:]}", pytrace=False)
    took = time.monotonic() - started
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    print(f"unit suite on Python {version}: {summary} ({took:.0f}s)")
    assert result.returncode == 0, (f"the unit suite fails on Python {version}:\n"
                                    f"{result.stdout[-8000:]}\n{result.stderr[-2000:]}")


HOLD_CLIENTS = r"""
import socket, sys
address = (sys.argv[1], int(sys.argv[2]))
idle = socket.create_connection(address, timeout=10)        # nothing sent: closed at once
partial = socket.create_connection(address, timeout=10)     # half a head: the router drains it
partial.sendall(b"GET /files/4m HTTP/1.1\r\nHost: arr\r\n")
print("connected", flush=True)
for sock in (idle, partial):
    sock.settimeout(60)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
print("closed", flush=True)
"""


def _interpreter_of(pid: int) -> str:
    return os.path.realpath(f"/proc/{pid}/exe")


STOCK_LOOP_MARK = "arr test: uvloop hidden, the stock asyncio loop runs"


def stock_loop_site(tmp_path: Path) -> Path:
    """A directory for PYTHONPATH whose sitecustomize hides uvloop."""
    site = tmp_path / "stock-loop"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.modules['uvloop'] = None  # import uvloop -> ImportError\n"
        f"print({STOCK_LOOP_MARK!r}, file=sys.stderr, flush=True)\n")
    return site


@pytest.mark.parametrize("version,loop", [(MAIN_VERSION, "uvloop")]
                         + [(v, loop) for v in OTHER_VERSIONS for loop in ("uvloop", "asyncio")])
def test_a_nat_handoff_and_a_stop_within_the_drain_time(version, loop, cluster, tmp_path):
    if version == MAIN_VERSION:
        assert sys.version_info[:2] == (3, 11), f"the main .venv runs Python {sys.version.split()[0]}, not 3.11"
        install = CHECKOUT
    else:
        python = venv_python(version)
        # An editable install of this checkout: the test bed starts it outside
        # the checkout, with its own bin/ first on PATH.
        env = [("PATH", f"{python.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
               ("HOME", str(tmp_path))]
        if loop == "asyncio":
            env.append(("PYTHONPATH", str(stock_loop_site(tmp_path))))
        install = ArrInstall(python=str(python), env=tuple(env))
    c = cluster(targets=1, files={"4m": 4 * MiB})
    info = c.files["4m"]
    with handoff_cluster(c, install=install, router={"drain_timeout": ROUTER_DRAIN}) as (router, agents):
        (agent,) = agents
        try:
            run_and_stop(version, c, router, agent, install, info)
        except BaseException:
            print(f"--- router log\n{router.log_tail()}\n--- agent log\n{agent.log_tail()}")
            raise
    for what, process in (("router", router), ("agent", agent)):
        log = process.log_path.read_text(errors="replace")
        assert "Traceback" not in log, f"Python {version}: the {what} logged a traceback:\n{log[-8000:]}"
        assert (STOCK_LOOP_MARK in log) == (loop == "asyncio"), f"the {what} did not run on {loop}"


def run_and_stop(version: str, c: Cluster, router: RouterProcess, agent: AgentProcess,
                 install: ArrInstall, info: FileInfo) -> None:
    """Downloads through the router, then stop the agent (router connected)
    and the router (clients connected), each within its drain time."""
    assert router.proc is not None and agent.proc is not None
    want = os.path.realpath(install.python)
    for what, proc in (("router", router.proc), ("agent", agent.proc)):
        assert _interpreter_of(proc.pid) == want, f"the {what} runs {_interpreter_of(proc.pid)}, not {want}"

    router.wait_healthy()
    for _ in range(2):
        body = c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "--max-time", "30",
                                 router.url + info.url_path], check=True, text=False).stdout
        assert hashlib.sha256(body).hexdigest() == info.sha256
    assert router.metric_sum("arr_handoffs_total", result="ok") == 2
    assert router.metric_sum("arr_handoff_fallbacks_total") == 0

    # The agent, with the router connected to it.
    assert wait_for(lambda: agent.metrics().get('arr_agent_control_sessions{stage="proven"}', 0) >= 1, 5.0), \
        "the router is not connected to the agent"
    started = time.monotonic()
    code = agent.stop()
    took = time.monotonic() - started
    bound = agent_drain_time() + STOP_SLACK
    assert code == 0 and took <= bound, (
        f"Python {version}: arr agent with a router connected stopped with status {code} after {took:.1f}s "
        f"(bound {bound:.1f}s; -9: it ignored SIGTERM and was killed)\n{agent.log_tail()}")
    print(f"Python {version}: agent stopped in {took:.2f}s")

    # The router, with a client idle and one half-way through a request head.
    holder = c.popen(c.client, [sys.executable, "-c", HOLD_CLIENTS, c.vip, "80"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "connected", holder.stdout.read()
    assert wait_for(lambda: router.metric_sum("arr_active_connections") >= 2, 5.0), \
        "the router does not hold the two client connections"
    started = time.monotonic()
    code = router.stop()
    took = time.monotonic() - started
    bound = ROUTER_DRAIN + STOP_SLACK
    assert code == 0 and took <= bound, (
        f"Python {version}: arr serve with clients connected stopped with status {code} after {took:.1f}s "
        f"(drain_timeout {ROUTER_DRAIN}s, bound {bound:.1f}s)\n{router.log_tail()}")
    print(f"Python {version}: router stopped in {took:.2f}s (drain_timeout {ROUTER_DRAIN}s)")
    try:
        rest, _ = holder.communicate(timeout=10)
    finally:
        c.stop_process(holder)
    assert "closed" in rest, f"the router's clients were not closed when it stopped: {rest!r}"
