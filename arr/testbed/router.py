"""Run ``arr serve`` inside a test-bed cluster's router namespace.

Shared by ``arr demo`` and the network tests, so both exercise the real
command an operator runs, configured the way an operator would configure it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from arr.testbed.cluster import NS_PREFIX, Cluster, Host, TestbedError

METRICS_PORT = 9100
ROUTER_PORT = 80
AGENT_PORT = 7070
AGENT_METRICS_PORT = 9101
BPF_DIR = "/run/arr/bpf"
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def python_env() -> dict[str, str]:
    """What a process needs to import this checkout (PYTHONPATH)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}


def secret_file(cluster: Cluster) -> Path:
    """The cluster's pre-shared control-channel key (created once, mode 0600)."""
    path = cluster.workdir / "secret"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32) + "\n")
    return path


def host_bpffs() -> Path:
    """bpffs mounted in this (the host's) mount namespace: processes started
    with ``ip netns exec`` see it, and their pins outlive them."""
    from handoff.datapath import ensure_bpffs

    return ensure_bpffs(BPF_DIR)


def pin_instance(cluster: Cluster, host: Host) -> str:
    return f"{cluster.id}-{host.name}"


def remove_stale_pins() -> list[str]:
    """Pins of test-bed clusters whose namespaces are gone (a run that was
    killed before its cleanup); pins of live clusters are left alone."""
    from arr import netlink

    root = Path(BPF_DIR)
    if not root.is_dir():
        return []
    live = {name.split("-")[0][-6:] for name in netlink.netns_list(NS_PREFIX)}
    removed = []
    for pins in root.iterdir():
        cluster_id = pins.name.split("-")[0]
        if re.fullmatch(r"[0-9a-f]{6}", cluster_id) and cluster_id not in live:
            shutil.rmtree(pins, ignore_errors=True)
            _forget_owner(pins.name)
            removed.append(pins.name)
    return removed


def _forget_owner(instance: str) -> None:
    from handoff.instances import forget_owner

    forget_owner(instance)


def remove_pins(cluster: Cluster) -> None:
    """Delete the pinned maps of every router and agent of this cluster."""
    root = Path(BPF_DIR)
    if root.is_dir():
        for pins in root.glob(f"{cluster.id}-*"):
            shutil.rmtree(pins, ignore_errors=True)
            _forget_owner(pins.name)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for the config shapes arr reads (tables, arrays of tables)."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items()
               if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if key in scalars:
            continue
        if isinstance(value, dict):
            if value and all(isinstance(v, dict) for v in value.values()) and key == "pools":
                for name, pool in value.items():
                    lines.append(f"\n[pools.{name}]")
                    lines.extend(f"{k} = {_toml_value(v)}" for k, v in pool.items())
                continue
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        else:
            for item in value:
                lines.append(f"\n[[{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


def parse_exposition(text: str) -> dict[str, float]:
    """Every sample of a Prometheus exposition as ``{'name{labels}': value}``."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def histogram_quantile(samples: dict[str, float], histogram: str, q: float) -> float | None:
    buckets = []
    for key, count in samples.items():
        match = re.fullmatch(re.escape(histogram) + r'_bucket\{.*?le="([^"]+)".*\}', key)
        if match:
            buckets.append((float(match.group(1)), count))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1)
        lower_bound, lower_count = bound, count
    return None


def default_config(cluster: Cluster, mode: str = "proxy", **sections: Any) -> dict[str, Any]:
    """One pool with every target of the cluster, round-robin, health-checked.
    SECTIONS override (a dict is merged into the section; None removes it)."""
    config: dict[str, Any] = {
        "router": {"listen": f"{cluster.vip}:{ROUTER_PORT}", "mode": mode,
                   "metrics": f"127.0.0.1:{METRICS_PORT}", "access_log": False,
                   "secret_file": str(secret_file(cluster)),
                   "admin_socket": str(cluster.workdir / "admin.sock")},
        "handoff": {"bpf_dir": BPF_DIR, "instance": pin_instance(cluster, cluster.router)},
        "targets": [{"address": f"{t.ip}:{cluster.spec.target_port}", "name": t.name,
                     "agent": f"{t.ip}:{AGENT_PORT}"} for t in cluster.targets],
        "policy": {"kind": "round-robin"},
        "health": {"path": "/health", "interval": 0.5, "rise": 2, "fall": 2, "timeout": 0.5},
    }
    for name, value in sections.items():
        if value is None:
            config.pop(name, None)  # e.g. pools of one's own instead of "targets"
        elif isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


@dataclass(frozen=True)
class ArrInstall:
    """Which arr a test bed runs: this checkout (the default), or an installed
    one, e.g. a wheel in a virtualenv (tests/net/test_wheel_net.py). An
    installed arr runs with ``env`` only and its interpreter's directory as
    PATH, so nothing of the checkout (nor a compiler) is within its reach."""

    python: str = sys.executable
    env: tuple[tuple[str, str], ...] = ()

    @property
    def checkout(self) -> bool:
        return self.python == sys.executable

    def environment(self) -> dict[str, str]:
        if self.checkout:
            return {**python_env(), **dict(self.env)}
        return {"PATH": str(Path(self.python).parent), **dict(self.env)}


CHECKOUT = ArrInstall()


def start_arr(cluster: Cluster, host: Host, argv: list[str], log_path: Path, port: tuple[str, int],
              timeout: float, what: str, install: ArrInstall = CHECKOUT) -> subprocess.Popen:
    """``python -m arr ARGV`` in HOST's namespace, waiting until PORT accepts."""
    with log_path.open("ab") as log:
        # An installed arr starts outside the checkout: ``-m`` puts the
        # working directory first on sys.path.
        proc = cluster.popen(host, [install.python, "-m", "arr", *argv],
                             stdout=log, stderr=subprocess.STDOUT, env=install.environment(),
                             cwd=None if install.checkout else str(cluster.workdir))
    deadline = time.monotonic() + timeout
    while not cluster.port_open(host, port[0], port[1], timeout=0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            cluster.stop_process(proc, grace=5.0)
            tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
            raise TestbedError(f"{what} did not come up:\n{tail}")
        time.sleep(0.05)
    return proc


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll PREDICATE until it holds or TIMEOUT passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class ArrProcess:
    """An ``arr`` process of the test bed, stopped by PID."""

    cluster: Cluster
    proc: subprocess.Popen | None
    log_path: Path
    install: ArrInstall

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        code = self.cluster.stop_process(self.proc, grace=10.0)
        self.proc = None
        return code

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


@dataclass
class RouterProcess(ArrProcess):
    """``arr serve`` in the router namespace, stopped by PID on ``stop``."""

    cluster: Cluster
    config: dict[str, Any]
    name: str = "router"
    proc: subprocess.Popen | None = None
    install: ArrInstall = CHECKOUT
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.cluster.workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://{self.cluster.vip}:{ROUTER_PORT}"

    def start(self, timeout: float = 15.0) -> "RouterProcess":
        config_path = self.cluster.workdir / f"{self.name}.toml"
        config_path.write_text(to_toml(self.config))
        host, port = self.config["router"]["listen"].rsplit(":", 1)
        self.proc = start_arr(self.cluster, self.cluster.router, ["serve", "--config", str(config_path)],
                              self.log_path, (host, int(port)), timeout, "arr serve", self.install)
        return self

    def wait_healthy(self, count: int | None = None, timeout: float = 10.0) -> None:
        """Until ``count`` targets (default all) report up in the router's
        metrics, and the router's control session with every agent is up."""
        want = len(self.cluster.targets) if count is None else count
        deadline = time.monotonic() + timeout
        # The router listens before its metrics endpoint does (start() waits
        # for the listener only): an endpoint not up yet is "not healthy yet".
        while not self.cluster.port_open(self.cluster.router, "127.0.0.1", METRICS_PORT, timeout=0.2):
            if time.monotonic() > deadline:
                raise TestbedError(f"the router's metrics endpoint 127.0.0.1:{METRICS_PORT} is not up")
            time.sleep(0.05)
        while self.metric_sum("arr_target_up") < want:
            if time.monotonic() > deadline:
                raise TestbedError(f"only {self.metric_sum('arr_target_up'):.0f}/{want} targets up")
            time.sleep(0.1)
        # And the control session with every agent (nat): until it is up, a
        # handoff falls back (agent-unavailable) and the request is proxied.
        while down := [k for k, v in self.metrics().items() if k.startswith("arr_agent_connected{") and v < 1]:
            if time.monotonic() > deadline:
                raise TestbedError(f"no control session with these agents: {down}")
            time.sleep(0.05)

    def metrics_text(self) -> str:
        cp = self.cluster.exec(self.cluster.router, [
            "curl", "-sS", "--noproxy", "*", "--max-time", "5",
            f"http://127.0.0.1:{METRICS_PORT}/metrics"], check=True)
        return cp.stdout

    def metrics(self) -> dict[str, float]:
        return parse_exposition(self.metrics_text())

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of ``name`` over the samples whose labels include ``labels``."""
        total = 0.0
        for key, value in self.metrics().items():
            sample, _, label_text = key.partition("{")
            if sample != name:
                continue
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
            if all(found.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def quantile(self, histogram: str, q: float) -> float | None:
        """Estimate quantile Q of a histogram from its buckets, interpolating
        linearly inside the bucket (Prometheus's histogram_quantile)."""
        return histogram_quantile(self.metrics(), histogram, q)

    def __enter__(self) -> "RouterProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def router_interface_bytes(cluster: Cluster) -> int:
    """Bytes that crossed every interface of the router namespace, both directions."""
    counters = cluster.interface_bytes(cluster.router)
    return sum(c.rx_bytes + c.tx_bytes for name, c in counters.items() if name != "lo")


@dataclass
class AgentProcess(ArrProcess):
    """``arr agent`` in a target's namespace, stopped by PID on ``stop``."""

    cluster: Cluster
    index: int
    overrides: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    install: ArrInstall = CHECKOUT

    @property
    def host(self) -> Host:
        return self.cluster.targets[self.index]

    @property
    def log_path(self) -> Path:
        return self.cluster.workdir / f"agent-{self.host.name}.log"

    @property
    def config_path(self) -> Path:
        return self.cluster.workdir / f"agent-{self.host.name}.toml"

    def start(self, timeout: float = 15.0) -> "AgentProcess":
        settings = {"listen": f"{self.host.ip}:{AGENT_PORT}", "secret_file": str(secret_file(self.cluster)),
                    "bpf_dir": BPF_DIR, "instance": pin_instance(self.cluster, self.host),
                    "linger": 1.0, "metrics": f"127.0.0.1:{AGENT_METRICS_PORT}", **self.overrides}
        self.config_path.write_text(to_toml({"agent": settings}))
        self.proc = start_arr(self.cluster, self.host, ["agent", "--config", str(self.config_path)],
                              self.log_path, (self.host.ip, AGENT_PORT), timeout,
                              f"arr agent on {self.host.name}", self.install)
        return self

    def metrics(self) -> dict[str, float]:
        return parse_exposition(self.cluster.exec(self.host, [
            "curl", "-sS", "--noproxy", "*", "--max-time", "5",
            f"http://127.0.0.1:{AGENT_METRICS_PORT}/metrics"]).stdout)


def handoff_outcomes(router: RouterProcess, agents: Sequence[AgentProcess]) -> str:
    """What the router and agents counted of fallbacks, take-backs, ended
    connections and refused control frames: read into a failed network
    test's message, it says which path a connection took before a reset."""
    router_prefixes = ("arr_handoff_fallbacks_total", "arr_takebacks_total", "arr_handons_total",
                       "arr_inplace_reroutes_total", "arr_router_takebacks_total",
                       "arr_control_rejected_total", "arr_redispatches_total", "arr_health_transitions_total",
                       "arr_migrations_total")
    agent_prefixes = ("arr_agent_connections_ended", "arr_agent_control_rejected", "arr_agent_handoffs_refused",
                      "arr_agent_reports_unrouted", "arr_agent_takeback_")
    parts = [f"router: {_nonzero(router.metrics, router_prefixes)}"]
    for agent in agents:
        parts.append(f"agent {agent.host.name}: {_nonzero(agent.metrics, agent_prefixes)}")
    return "; ".join(parts)


def _nonzero(read: Callable[[], dict[str, float]], prefixes: tuple[str, ...]) -> dict[str, float] | str:
    try:
        samples = read()
    except Exception as exc:  # noqa: BLE001: a stopped process; the test's own failure matters
        return f"unreadable ({exc.__class__.__name__})"
    return {k: v for k, v in samples.items() if k.startswith(prefixes) and v}


def clear_handoff_programs(cluster: Cluster) -> int:
    """Detach arr's tc programs from the router's and targets' interfaces.

    ``arr serve``/``arr agent`` leave their programs attached when they stop (so
    a restart keeps handed-off connections alive), and ``handoff_cluster`` only
    removes the pins: the programs would go on rewriting packets that match the
    last run's flow entries, hijacking later connections that reuse a client
    port. ``handoff_cluster`` calls this when it ends, so whatever runs next in
    the cluster starts on clean interfaces. Returns how many filters were removed."""
    from arr import netlink

    removed = 0
    for host in [cluster.router, *cluster.targets]:
        for ifname in cluster.interface_bytes(host):
            if ifname == "lo":
                continue
            for direction in ("ingress", "egress"):
                if netlink.bpf_detach(host.ns, ifname, direction):
                    removed += 1
    return removed


@contextmanager
def handoff_cluster(cluster: Cluster, mode: str = "nat", agent: dict[str, Any] | None = None,
                    install: ArrInstall = CHECKOUT,
                    **sections: Any) -> Iterator[tuple[RouterProcess, list[AgentProcess]]]:
    """Agents on every target (``agent``: their [agent] overrides) and a router
    in MODE (``sections``: overrides of its config sections), all run from
    INSTALL; pins removed at the end."""
    host_bpffs()
    agents: list[AgentProcess] = []
    router = RouterProcess(cluster, default_config(cluster, mode, **sections), install=install)
    try:
        if mode == "nat":
            agents = [AgentProcess(cluster, i, dict(agent or {}), install=install).start()
                      for i in range(len(cluster.targets))]
        router.start()
        yield router, agents
    finally:
        router.stop()
        for agent in agents:
            agent.stop()
        clear_handoff_programs(cluster)
        remove_pins(cluster)
