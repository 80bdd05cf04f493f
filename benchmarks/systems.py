"""The systems under test, each started inside a test-bed cluster.

``direct``     the client downloads from the targets themselves (no router)
``arr-nat``    ``arr serve`` in nat mode (handoff) + ``arr agent`` on each target
``arr-nat-reuse``  the same with ``handoff.reuse_forward``: a taken-back
               connection's old forwarding connection goes back to the forward
               pool instead of closing (keep-alive routing test only)
``arr-proxy``  ``arr serve`` in proxy mode (arr relays every byte)
``haproxy``    HAProxy, http mode, ``nbthread 1``, in the router namespace
``haproxy-splice``  the same plus ``option splice-response``: response bodies
               move socket to socket through a pipe (splice(2)) without being
               copied to user space, the best a classic proxy does for large ones
``nginx``      nginx ``proxy_pass``, ``worker_processes 1``, upstream keepalive

Routers listen on the cluster's vip:80, one system at a time. Everything is
started with ``cluster.popen`` (stopped by PID on exit, also on failure).
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

from arr.testbed import Cluster
from arr.testbed import nginx as tb_nginx
from arr.testbed.router import BPF_DIR, clear_handoff_programs, handoff_cluster, pin_instance
from benchmarks.measure import ROUTE_HEADER, BenchError, forward_ports_of, forward_time_wait, wait_for
from handoff.agent import AgentSettings

SYSTEMS = ("direct", "arr-nat", "arr-nat-reuse", "arr-proxy", "haproxy", "haproxy-splice", "nginx")
REHANDOFF_ONLY = ("arr-nat-reuse",)
"""Run in the keep-alive routing test only: elsewhere they are arr-nat."""
ROUTER_PORT = 80
MAX_CONNS = 19000

HAPROXY_MAXCONN = 12000
"""HAProxy wants 2 fds per connection up front; the VM's hard fd limit is 20,000
(no CAP_SYS_RESOURCE to raise it), so ``no strict-limits`` lets it start anyway:
idle client connections share a few server connections, so 10k fit."""

ARR_LIMITS = {"max_connections": MAX_CONNS, "keepalive_timeout": 300}
"""arr defaults to 10,000 connections and a 60 s keep-alive; the memory test holds
up to 10,000 idle connections for longer than that."""

ARR_AGENT = {"linger": next(f.default for f in fields(AgentSettings) if f.name == "linger")}
"""The agents run with their own default linger (0: an entry goes with its
connection), not the test bed's 1 s (arr/testbed/router.py ``AgentProcess``),
which costs each ended connection a second sock_diag lookup, at the linger's end
(handoff/agent_lifecycle.py): 17% of the agents' CPU per handoff in the
new-connection test (0.465 against 0.388 ms, benchmarks/RESULTS.md)."""


@dataclass
class Running:
    name: str
    urls: list[str]  # base URLs the load generators use (one load generator per entry)
    roots: list[int] = field(default_factory=list)  # router process PIDs (descendants counted too)
    router: object | None = None  # RouterProcess for arr systems
    config: str = ""  # the configuration text, for the report
    agent_roots: list[int] = field(default_factory=list)  # arr agents on the targets (not router CPU)

    def url(self, i: int, path: str) -> str:
        return self.urls[i % len(self.urls)] + path


# ------------------------------------------------------------------- targets

def bench_target_config(text: str, nofile: int) -> tuple[str, list[str]]:
    """The test bed's target nginx.conf with room for the memory test: at least
    19,000 worker connections, ``worker_rlimit_nofile`` at the fd limit this
    process can grant (asking for more only makes nginx log an alert), and a
    300 s keep-alive so held connections outlive the slowest opening phase.
    Returns the text and what changed."""
    import re

    changes: list[str] = []

    def sub(pattern: str, repl, what: str) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, count=1, flags=re.M)
        if not n:
            raise BenchError(f"test-bed nginx config changed: no {what}")

    def conns(m: "re.Match[str]") -> str:
        n = max(int(m.group(1)), min(19000, nofile - 500))
        changes.append(f"worker_connections {m.group(1)} -> {n}")
        return f"worker_connections {n};"

    sub(r"^\s*worker_connections\s+(\d+);", lambda m: "    " + conns(m), "worker_connections")
    if re.search(r"^worker_rlimit_nofile\s+\d+;", text, flags=re.M):
        sub(r"^worker_rlimit_nofile\s+(\d+);", f"worker_rlimit_nofile {nofile};", "worker_rlimit_nofile")
    else:
        sub(r"^(worker_processes\s+\d+;)", rf"\1\nworker_rlimit_nofile {nofile};", "worker_processes")
    changes.append(f"worker_rlimit_nofile {nofile}")
    sub(r"^(\s*)keepalive_timeout\s+\d+;", r"\1keepalive_timeout 300;", "keepalive_timeout")
    changes.append("keepalive_timeout 300")
    return text, changes


def bench_targets(cluster: Cluster) -> str:
    """Restart every target's nginx with :func:`bench_target_config` (same
    unmodified nginx binary, same files, same logs). Returns what changed."""
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    changes: list[str] = []
    for i, t in enumerate(cluster.targets):
        paths = tb_nginx.NginxPaths(cluster.workdir / "targets" / t.name)
        text = tb_nginx.render_config(paths, label=t.name, ip=t.ip, port=cluster.spec.target_port,
                                      www_root=cluster.workdir / "www")
        text, changes = bench_target_config(text, nofile)
        cluster.stop_target(i)
        paths.conf.write_text(text)
        with open(paths.root / "nginx.stdout", "ab") as out:
            proc = cluster.popen(t, tb_nginx.command(paths), stdout=out, stderr=subprocess.STDOUT)
        if not wait_for(lambda: cluster.port_open(t, t.ip, cluster.spec.target_port, 0.2), 10):
            raise BenchError(f"bench nginx on {t.name} did not come up (exit {proc.poll()})")
    return ", ".join(changes)


# ------------------------------------------------------------------- routers

HAPROXY_SPLICE = """\
    # Response bodies go kernel to kernel (splice(2) through a pipe), never
    # copied into HAProxy's buffers. Only the response side: the benchmark's
    # requests are body-less GETs, so splice-request would change nothing, and
    # splice-auto only splices once HAProxy's heuristics see a large transfer,
    # a subset of what splice-response does.
    option splice-response
"""


def haproxy_config(cluster: Cluster, workdir: Path, splice: bool = False, by_header: bool = False) -> str:
    """HAProxy's configuration; BY_HEADER: the keep-alive routing test's routing
    (:func:`header_routing`), one backend per target chosen on ROUTE_HEADER,
    instead of round-robin over both."""
    servers = "\n".join(f"    server {t.name} {t.ip}:{cluster.spec.target_port}" for t in cluster.targets)
    routing = f"""\
frontend fe
    bind {cluster.vip}:{ROUTER_PORT} backlog 4096
    default_backend be
"""
    backends = f"""\
backend be
    balance roundrobin
{servers}
"""
    if by_header:
        first, second = cluster.targets[0], cluster.targets[1]
        routing = f"""\
frontend fe
    bind {cluster.vip}:{ROUTER_PORT} backlog 4096
    use_backend be_{second.name} if {{ req.hdr({ROUTE_HEADER}) -m str t1 }}
    default_backend be_{first.name}
"""
        backends = "\n".join(f"backend be_{t.name}\n    server {t.name} {t.ip}:{cluster.spec.target_port}\n"
                             for t in (first, second))
    return f"""\
global
    nbthread 1
    maxconn {HAPROXY_MAXCONN}
    no strict-limits
    pidfile {workdir}/haproxy.pid
    tune.bufsize 16384

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 3s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    timeout http-request 10s
    maxconn {HAPROXY_MAXCONN}
{HAPROXY_SPLICE if splice else ""}
{routing}
{backends}"""


def nginx_proxy_config(cluster: Cluster, workdir: Path, by_header: bool = False) -> str:
    """nginx's configuration; BY_HEADER: one upstream per target chosen on
    ROUTE_HEADER (a ``map`` to the upstream's name), the keep-alive routing
    test's routing, instead of round-robin over both."""
    servers = "\n".join(f"        server {t.ip}:{cluster.spec.target_port};" for t in cluster.targets)
    upstreams = f"""\
    upstream be {{
{servers}
        keepalive 64;
        keepalive_requests 10000;
    }}
"""
    upstream_name = "be"
    if by_header:
        first, second = cluster.targets[0], cluster.targets[1]
        header_var = "$http_" + ROUTE_HEADER.lower().replace("-", "_")
        upstreams = f"""\
    map {header_var} $bench_upstream {{
        t1 be_{second.name};
        default be_{first.name};
    }}
""" + "".join(f"""\
    upstream be_{h.name} {{
        server {h.ip}:{cluster.spec.target_port};
        keepalive 64;
        keepalive_requests 10000;
    }}
""" for h in (first, second))
        upstream_name = "$bench_upstream"
    t = workdir / "tmp"
    return f"""\
daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;

events {{
    worker_connections {MAX_CONNS};
}}

http {{
    access_log off;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    keepalive_timeout 300;
    keepalive_requests 10000;

{upstreams}
    server {{
        listen {cluster.vip}:{ROUTER_PORT} backlog=4096;
        location / {{
            proxy_pass http://{upstream_name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def _wait_listening(cluster: Cluster, proc: subprocess.Popen, name: str, log: Path) -> None:
    ok = wait_for(lambda: proc.poll() is None and cluster.port_open(cluster.router, cluster.vip,
                                                                    ROUTER_PORT, 0.2), 15)
    if not ok:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        cluster.stop_process(proc)
        raise BenchError(f"{name} did not listen on {cluster.vip}:{ROUTER_PORT}: {tail}")


@contextmanager
def _external(cluster: Cluster, name: str, config: str, argv_of) -> Iterator[Running]:
    workdir = cluster.workdir / f"bench-{name}"
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    conf = workdir / f"{name}.conf"
    conf.write_text(config)
    log = workdir / "stdout.log"
    with log.open("ab") as out:
        proc = cluster.popen(cluster.router, argv_of(conf), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(cluster, proc, name, log)
        yield Running(name, [f"http://{cluster.vip}:{ROUTER_PORT}"] * 2, [proc.pid], None, config)
    finally:
        cluster.stop_process(proc)


def header_routing(cluster: Cluster, health: dict | None = None) -> dict:
    """arr router config sections for the keep-alive routing test: the first
    target alone in the default pool (the top-level ``[[targets]]``, which the
    test bed's configuration always has), the second alone in pool ``t1``, and
    a rule that sends a request carrying ``ROUTE_HEADER: t1`` to pool ``t1``.
    The client's header (measure.ROUTE_LUA) then says where each request goes:
    the policy decides every request, and whether two requests of a connection
    go to the same target is the client's choice, exactly, not round-robin's
    luck (a global round-robin's turn depends on how the connections interleave).
    HEALTH overrides the health checks' settings (both pools)."""
    from arr.testbed.router import default_config

    base = default_config(cluster, "nat", **({"health": health} if health else {}))
    first, second = base["targets"][:2]
    return {"targets": [first],
            "pools": {"t1": {"targets": [second], "policy": dict(base["policy"]),
                             "health": dict(base["health"])}},
            "rules": [{"pool": "t1", "header": {"name": ROUTE_HEADER, "value": "^t1$"}}]}


def single_target(cluster: Cluster) -> list[dict[str, str]]:
    """The router config's ``targets`` with only the cluster's first target."""
    from arr.testbed.router import default_config

    return default_config(cluster, "nat")["targets"][:1]


@contextmanager
def start_system(cluster: Cluster, name: str, one_target: bool = False,
                 by_header: bool = False, health: dict | None = None) -> Iterator[Running]:
    """Start NAME in CLUSTER, yield how to reach and watch it, stop it.

    ``one_target`` (arr systems): the router's configuration lists only the
    first target, so every connection goes to it (the sustain test).
    ``by_header``: every router routes each request on ROUTE_HEADER, one target
    per value (:func:`header_routing`, ``haproxy_config``, ``nginx_proxy_config``;
    the keep-alive routing test). ``health`` (arr systems): overrides of the
    health checks' settings (arr.testbed.loss.LOSSY_HEALTH under loss)."""
    if by_header and len(cluster.targets) < 2:
        raise BenchError("routing by header needs two targets")
    clear_handoff_programs(cluster)
    if name == "direct":
        yield Running(name, [f"http://{t.ip}:{cluster.spec.target_port}" for t in cluster.targets])
    elif name in ("arr-nat", "arr-nat-reuse", "arr-proxy"):
        mode = name.split("-")[1]
        if mode == "nat":  # an earlier test's take-backs must not take this one's forward ports
            forward_time_wait(cluster, forward_ports_of(None), kill=True)
        sections: dict = {"limits": ARR_LIMITS}
        if name == "arr-nat-reuse":
            sections["handoff"] = {"reuse_forward": True}
        if one_target:
            sections["targets"] = single_target(cluster)
        if health:
            sections["health"] = health
        if by_header:
            sections.update(header_routing(cluster, health))
        try:
            with handoff_cluster(cluster, mode, agent=ARR_AGENT, **sections) as (router, agents):
                router.wait_healthy(count=1 if one_target else None, timeout=15)
                cfg_path = cluster.workdir / f"{router.name}.toml"
                cfg = cfg_path.read_text() if cfg_path.exists() else ""
                # The agents' too (one per target, the same but for its addresses). An
                # older tree's test bed has no config_path (benchmarks.ab runs this
                # harness on it).
                agent_path = getattr(agents[0], "config_path", None) if agents else None
                if agent_path is not None and agent_path.exists():
                    cfg += f"\n# {agent_path.name}\n{agent_path.read_text()}"
                yield Running(name, [router.url] * 2, [router.proc.pid], router, cfg,
                              [a.proc.pid for a in agents if a.proc is not None])
        finally:
            clear_handoff_programs(cluster)
    elif name in ("haproxy", "haproxy-splice"):
        workdir = cluster.workdir / f"bench-{name}"
        workdir.mkdir(exist_ok=True)
        with _external(cluster, name, haproxy_config(cluster, workdir, splice=name == "haproxy-splice",
                                                     by_header=by_header),
                       lambda conf: ["haproxy", "-db", "-f", str(conf)]) as r:
            yield r
    elif name == "nginx":
        workdir = cluster.workdir / "bench-nginx"
        workdir.mkdir(exist_ok=True)
        with _external(cluster, name, nginx_proxy_config(cluster, workdir, by_header=by_header),
                       lambda conf: ["nginx", "-p", f"{workdir}/", "-c", str(conf),
                                     "-e", f"{workdir}/error.log"]) as r:
            yield r
    else:
        raise ValueError(f"unknown system {name!r} (have: {', '.join(SYSTEMS)})")


def arr_map_entries(cluster: Cluster) -> dict[str, tuple[int, int, int]]:
    """{map: (entries, key size, value size)} of the router's pinned handoff maps."""
    from handoff.libbpf import BpfMap
    from handoff.maps import FlowEntry, FlowKey, WatchEntry

    pin_dir = Path(BPF_DIR) / pin_instance(cluster, cluster.router)
    out = {}
    for name, value_type in (("arr_ingress", FlowEntry), ("arr_watch", WatchEntry)):
        m = BpfMap.pinned(pin_dir / name, FlowKey, value_type)
        try:
            out[name] = (len(m.keys()), ctypes_size(FlowKey), ctypes_size(value_type))
        finally:
            m.close()
    return out


def ctypes_size(t) -> int:
    import ctypes

    return ctypes.sizeof(t)
