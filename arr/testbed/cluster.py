"""A throw-away cluster of network namespaces: client, router, targets (nginx).

Layout (addresses for the default subnets)::

    bridge:   client 10.200.1.100 ─┐
              router 10.200.1.1   ─┼─ br0 (in its own "sw" namespace)
              t<i>   10.200.1.1<i>─┘

    gateway:  client 10.200.2.100 ── gw 10.200.2.1 | gw 10.200.1.254 ─┐
              router 10.200.1.1   ────────────────────────────────────┼─ br0
              t<i>   10.200.1.1<i>────────────────────────────────────┘
              client: default via gw; router and targets: client subnet via gw
              (so target -> client replies never pass the router).

Nothing is created in the caller's network namespace. Everything a cluster
makes is removed on exit (see :meth:`Cluster.close`), and
:func:`cleanup_stale` removes what a crashed run left behind.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Mapping, Sequence

from arr import netlink
from arr.netlink import Counters
from arr.testbed import nginx as _nginx
from arr.testbed.files import FileInfo, sha256_file, write_files

NS_PREFIX = "arrtb"
TESTBED_NET = ipaddress.ip_network("10.200.0.0/16")
BRIDGE = "br0"
HOST_IF = "eth0"  # the host side of every veth, in each host's namespace
GW_CLIENT_IF = "eth1"  # the gateway's leg towards the client subnet
_ROLE_RE = r"[a-z0-9]+"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")

Topology = Literal["bridge", "gateway"]


class TestbedError(RuntimeError):
    """The test bed could not be built or an operation on it failed."""

    __test__ = False  # not a pytest test class


class CommandError(subprocess.CalledProcessError):
    """A command run in a namespace failed; str() includes its stderr tail."""

    def __str__(self) -> str:
        base = super().__str__()
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        tail = (err or "").strip()[-2000:]
        return f"{base}\n--- stderr ---\n{tail}" if tail else base


@dataclass(frozen=True)
class ClusterSpec:
    targets: int = 2
    topology: Topology = "bridge"
    files: Mapping[str, int] = field(default_factory=lambda: {"1k": 1024, "1m": 1 << 20})
    target_port: int = 8080
    bridge_subnet: str = "10.200.1.0/24"
    client_subnet: str = "10.200.2.0/24"  # used by the "gateway" topology
    disable_ipv6: bool = True
    start_nginx: bool = True
    ready_timeout: float = 10.0

    def validate(self) -> None:
        if self.topology not in ("bridge", "gateway"):
            raise ValueError(f"topology must be 'bridge' or 'gateway', not {self.topology!r}")
        if not 1 <= self.targets <= 100:
            raise ValueError(f"targets must be 1..100, not {self.targets}")
        if not 1 <= self.target_port <= 65535:
            raise ValueError(f"bad target_port {self.target_port}")
        for s in (self.bridge_subnet, self.client_subnet):
            net = ipaddress.ip_network(s, strict=True)
            if not net.subnet_of(TESTBED_NET) or net.prefixlen > 24:  # type: ignore[arg-type]
                raise ValueError(f"subnet {s} must be a /24 or larger inside {TESTBED_NET}")
        if self.topology == "gateway":
            a = ipaddress.ip_network(self.bridge_subnet)
            b = ipaddress.ip_network(self.client_subnet)
            if a.overlaps(b):
                raise ValueError("bridge_subnet and client_subnet overlap")


@dataclass(frozen=True)
class Host:
    name: str  # label: "client", "router", "gw", "t0", "t1", ...
    ns: str  # network namespace name
    ip: str  # main IPv4 address
    ifname: str  # interface carrying ip, inside ns
    prefixlen: int = 24

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


@dataclass(frozen=True)
class CurlResult:
    status: int  # HTTP status, 0 if no response (see exit_code / error)
    sha256: str  # of the body bytes received
    size: int  # body bytes received
    time_total: float  # curl's %{time_total}, seconds
    exit_code: int = 0  # curl's exit code (7 = connection refused, 28 = timeout)
    error: str = ""  # curl's stderr
    path: Path | None = None  # where the body is, if kept (output= given)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and 200 <= self.status < 300


def _host_ip(net: ipaddress.IPv4Network | ipaddress.IPv6Network, n: int) -> str:
    return str(net.network_address + n)


def _clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    base = dict(os.environ if env is None else env)
    for k in list(base):
        if k.lower() in _PROXY_VARS:
            del base[k]
    return base


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return data[-limit:].decode(errors="replace")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is as good as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_pids(pids: Sequence[int], grace: float) -> None:
    """SIGTERM each PID, wait up to GRACE s, SIGKILL the rest, wait briefly."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        live = [p for p in pids if _pid_alive(p)]
        if not live:
            return
        for p in live:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_pid_alive(p) for p in live):
            time.sleep(0.02)


def _stop_popens(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM the still-running ones (by PID), wait, SIGKILL, reap."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


# live clusters of this process, closed at interpreter exit if still open
_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _close_live_clusters() -> None:
    for c in list(_LIVE):
        try:
            c.close()
        except BaseException:  # noqa: BLE001 - best effort at exit
            pass


class Cluster:
    """Build with ``with Cluster(spec) as c:``; everything is removed on exit."""

    def __init__(self, spec: ClusterSpec | None = None, *, prefix: str = NS_PREFIX, tmpdir: str | None = None):
        self.spec = spec or ClusterSpec()
        self.spec.validate()
        if not re.fullmatch(r"[a-z][a-z0-9]{1,8}", prefix):
            raise ValueError(f"bad prefix {prefix!r}")
        self.prefix = prefix
        self.id = secrets.token_hex(3)
        self._tmpdir = tmpdir or tempfile.gettempdir()
        self.workdir = Path(self._tmpdir) / f"{prefix}{self.id}"
        self.files: dict[str, FileInfo] = {}
        self.namespaces: list[str] = []  # created so far, in order
        self.switch_ns = self._ns("sw")
        self.client: Host
        self.router: Host
        self.gateway: Host | None = None
        self.targets: list[Host] = []
        self.build_time: float | None = None
        self._procs: list[subprocess.Popen] = []
        self._all_pids: list[int] = []  # every PID popen() started, for leftovers()
        self._nginx: dict[int, subprocess.Popen | None] = {}
        self._lock_fd: int | None = None
        self._started = False
        self._closed = False
        self._curl_seq = 0
        self._plan_hosts()

    # ------------------------------------------------------------------ plan

    def _ns(self, role: str) -> str:
        return f"{self.prefix}{self.id}-{role}"

    def _plan_hosts(self) -> None:
        s = self.spec
        bnet = ipaddress.ip_network(s.bridge_subnet)
        plen = bnet.prefixlen
        self.router = Host("router", self._ns("router"), _host_ip(bnet, 1), HOST_IF, plen)
        self.targets = [
            Host(f"t{i}", self._ns(f"t{i}"), _host_ip(bnet, 11 + i), HOST_IF, plen) for i in range(s.targets)
        ]
        if s.topology == "bridge":
            self.client = Host("client", self._ns("client"), _host_ip(bnet, 100), HOST_IF, plen)
        else:
            cnet = ipaddress.ip_network(s.client_subnet)
            self.gateway = Host("gw", self._ns("gw"), _host_ip(bnet, 254), HOST_IF, plen)
            self.client = Host("client", self._ns("client"), _host_ip(cnet, 100), HOST_IF, cnet.prefixlen)
            self.gateway_client_ip = _host_ip(cnet, 1)

    @property
    def vip(self) -> str:
        return self.router.ip

    @property
    def hosts(self) -> list[Host]:
        hs = [self.client, self.router]
        if self.gateway is not None:
            hs.append(self.gateway)
        return hs + list(self.targets)

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except BaseException as cleanup_error:
            if exc is None:
                raise
            exc.add_note(f"[arr.testbed] cleanup also failed: {cleanup_error!r}")

    def start(self) -> Cluster:
        if self._started:
            raise TestbedError("cluster already started")
        self._started = True
        _LIVE.add(self)
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException as e:
            try:
                self.close()
            except BaseException as cleanup_error:  # noqa: BLE001
                e.add_note(f"[arr.testbed] cleanup after failed build also failed: {cleanup_error!r}")
            raise
        self.build_time = time.monotonic() - t0
        return self

    def _build(self) -> None:
        s = self.spec
        os.mkdir(self.workdir, 0o700)
        self._lock_fd = os.open(self.workdir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())

        www = self.workdir / "www"
        self.files = write_files(www / "files", s.files)

        for ns in [self.switch_ns] + [h.ns for h in self.hosts]:
            self._make_ns(ns)

        netlink.bridge_create(self.switch_ns, BRIDGE)
        netlink.link_up(self.switch_ns, BRIDGE)
        bridged = [self.router] + self.targets + ([self.gateway] if self.gateway else [self.client])
        for h in bridged:
            self._attach_to_bridge(h)

        if self.gateway is not None:
            gw, cl = self.gateway, self.client
            netlink.veth_create(gw.ns, GW_CLIENT_IF, cl.ns, cl.ifname)
            netlink.addr_add(gw.ns, GW_CLIENT_IF, f"{self.gateway_client_ip}/{cl.prefixlen}")
            netlink.link_up(gw.ns, GW_CLIENT_IF)
            netlink.addr_add(cl.ns, cl.ifname, cl.cidr)
            netlink.link_up(cl.ns, cl.ifname)
            netlink.route_add_default(cl.ns, self.gateway_client_ip)
            netlink.sysctl_set(gw.ns, {"net.ipv4.ip_forward": 1})
            for h in [self.router] + self.targets:
                netlink.route_add(h.ns, s.client_subnet, gw.ip)

        if s.start_nginx:
            for i in range(len(self.targets)):
                self._spawn_nginx(i)
            for i in range(len(self.targets)):
                self._wait_nginx(i)

    def _make_ns(self, ns: str) -> None:
        netlink.netns_create(ns)
        self.namespaces.append(ns)
        if self.spec.disable_ipv6 and os.path.isdir("/proc/sys/net/ipv6"):
            netlink.sysctl_set(
                ns,
                {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1},
            )
        netlink.link_up(ns, "lo")

    def _attach_to_bridge(self, h: Host) -> None:
        port = f"v-{h.name}"
        netlink.veth_create(self.switch_ns, port, h.ns, h.ifname)
        netlink.link_set_master(self.switch_ns, port, BRIDGE)
        netlink.link_up(self.switch_ns, port)
        netlink.addr_add(h.ns, h.ifname, h.cidr)
        netlink.link_up(h.ns, h.ifname)

    def close(self) -> None:
        """Remove everything: processes (by PID), namespaces, workdir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        interrupted: BaseException | None = None

        def step(fn, *args) -> None:
            nonlocal interrupted
            try:
                fn(*args)
            except (KeyboardInterrupt, SystemExit) as e:
                interrupted = interrupted or e
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        step(_stop_popens, self._procs)
        # anything still living in our namespaces was started by us (children
        # of tracked processes, orphaned nginx workers): stop it by PID.
        for ns in self.namespaces:
            step(lambda n=ns: _kill_pids(netlink.netns_pids(n), 1.0))
        for ns in reversed(self.namespaces):
            step(netlink.netns_delete, ns)
        if self._lock_fd is not None:
            step(os.close, self._lock_fd)
            self._lock_fd = None
        if self.workdir.exists():
            step(shutil.rmtree, self.workdir)
        _LIVE.discard(self)
        if interrupted is not None:
            raise interrupted
        if errors:
            raise TestbedError(f"cluster {self.id} cleanup: " + "; ".join(repr(e) for e in errors)) from errors[0]

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (empty after a clean close())."""
        left = [f"netns {n}" for n in self.namespaces if netlink.netns_exists(n)]
        left += [f"pid {p}" for p in self._all_pids if _pid_alive(p)]
        if self.workdir.exists():
            left.append(f"workdir {self.workdir}")
        return left

    # ------------------------------------------------------------- processes

    def _argv(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        ns = host if isinstance(host, str) else host.ns
        if ns not in self.namespaces:
            raise TestbedError(f"{ns!r} is not a namespace of cluster {self.id}")
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a sequence of strings, not a string")
        # ip by absolute path: a command may run with a PATH of its own
        # (an installed arr, tests/net/test_wheel_net.py) that lacks it.
        return [shutil.which("ip") or "ip", "netns", "exec", ns, *map(str, argv)]

    def exec(
        self,
        host: Host | str,
        argv: Sequence[str],
        timeout: float = 60.0,
        check: bool = True,
        *,
        input: str | bytes | None = None,  # noqa: A002
        text: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ARGV inside HOST's namespace and wait (output captured)."""
        full = self._argv(host, argv)
        cp = subprocess.run(
            full,
            input=input,
            capture_output=True,
            text=text,
            timeout=timeout,
            env=_clean_env(env),
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and cp.returncode != 0:
            raise CommandError(cp.returncode, full, cp.stdout, cp.stderr)
        return cp

    def popen(self, host: Host | str, argv: Sequence[str], **popen_kw) -> subprocess.Popen:
        """Start ARGV inside HOST's namespace; it is stopped by PID on close().

        ``ip netns exec`` execs the command, so the Popen's PID is the
        command's own. Defaults: stdin=DEVNULL, own session, no proxy env.
        """
        if self._closed or not self._started:
            raise TestbedError("cluster is not running")
        full = self._argv(host, argv)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        popen_kw.setdefault("start_new_session", True)
        popen_kw["env"] = _clean_env(popen_kw.get("env"))
        proc = subprocess.Popen(full, **popen_kw)
        self._procs.append(proc)
        self._all_pids.append(proc.pid)
        return proc

    def stop_process(self, proc: subprocess.Popen, grace: float = 5.0) -> int | None:
        """Stop one tracked process by PID (SIGTERM, then SIGKILL)."""
        _stop_popens([proc], grace)
        return proc.returncode

    # ------------------------------------------------------------------ nginx

    def _nginx_paths(self, i: int) -> _nginx.NginxPaths:
        return _nginx.NginxPaths(self.workdir / "targets" / self.targets[i].name)

    def _spawn_nginx(self, i: int) -> subprocess.Popen:
        t = self.targets[i]
        paths = self._nginx_paths(i)
        _nginx.write_config(
            paths, label=t.name, ip=t.ip, port=self.spec.target_port, www_root=self.workdir / "www"
        )
        out: IO[bytes]
        with open(paths.root / "nginx.stdout", "ab") as out:
            proc = self.popen(t, _nginx.command(paths), stdout=out, stderr=subprocess.STDOUT)
        self._nginx[i] = proc
        return proc

    def _wait_nginx(self, i: int) -> None:
        t, proc, paths = self.targets[i], self._nginx[i], self._nginx_paths(i)
        assert proc is not None
        deadline = time.monotonic() + self.spec.ready_timeout
        last = ""
        while True:
            rc = proc.poll()
            if rc is not None:
                raise TestbedError(
                    f"nginx for {t.name} ({t.ns}) exited with {rc} before listening on "
                    f"{t.ip}:{self.spec.target_port}\n--- {paths.error_log} ---\n{_tail(paths.error_log)}"
                    f"\n--- stdout ---\n{_tail(paths.root / 'nginx.stdout')}"
                )
            try:
                if self.port_open(t, t.ip, self.spec.target_port, timeout=0.5):
                    return
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"nginx for {t.name} ({t.ns}) not accepting on {t.ip}:{self.spec.target_port} "
                    f"after {self.spec.ready_timeout}s {last}\n--- {paths.error_log} ---\n{_tail(paths.error_log)}"
                )
            time.sleep(0.02)

    def port_open(self, host: Host, ip: str, port: int, timeout: float = 1.0) -> bool:
        """True if a TCP connect from HOST's namespace to ip:port succeeds."""
        s = netlink.socket_in_netns(host.ns)
        try:
            s.settimeout(timeout)
            return s.connect_ex((ip, port)) == 0
        finally:
            s.close()

    def start_target(self, i: int) -> None:
        """Start target I's nginx (no-op if running) and wait until it accepts."""
        proc = self._nginx.get(i)
        if proc is not None and proc.poll() is None:
            return
        self._spawn_nginx(i)
        self._wait_nginx(i)

    def stop_target(self, i: int, grace: float = 5.0) -> None:
        """Stop target I's nginx by PID (SIGTERM to the master, SIGKILL after GRACE)."""
        proc = self._nginx.get(i)
        self._nginx[i] = None
        if proc is None:
            return
        _stop_popens([proc], grace)
        if proc.returncode == -signal.SIGKILL:  # workers may be orphaned
            orphans = [p for p in netlink.netns_pids(self.targets[i].ns) if _comm(p) == "nginx"]
            _kill_pids(orphans, 1.0)
        self._procs.remove(proc)

    def nginx_pids(self) -> dict[int, int]:
        """Master PID of each running target nginx."""
        return {i: p.pid for i, p in self._nginx.items() if p is not None and p.poll() is None}

    def nginx_log(self, i: int) -> list[str]:
        path = self._nginx_paths(i).access_log
        try:
            return path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def uploaded(self, i: int, name: str) -> Path:
        """The file target I's nginx stored for ``PUT /uploads/NAME``."""
        return self._nginx_paths(i).put_root / "uploads" / name

    def whoami_sha256(self, i: int) -> str:
        """SHA-256 of target I's answer to ``/whoami`` (its name and a newline,
        arr/testbed/nginx.py): for clients that check every body they read."""
        return hashlib.sha256(f"{self.targets[i].name}\n".encode()).hexdigest()

    def nginx_error_log(self, i: int) -> str:
        return _tail(self._nginx_paths(i).error_log, 1 << 20)

    def target_url(self, i: int, path: str = "/") -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.targets[i].ip}:{self.spec.target_port}{path}"

    # ------------------------------------------------------------------- curl

    def curl(
        self,
        url: str,
        output: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        *,
        host: Host | None = None,
        timeout: float = 60.0,
    ) -> CurlResult:
        """GET URL with real curl from the client (or HOST) namespace.

        The body goes to a file (OUTPUT, relative paths under workdir; else a
        temporary file removed after hashing) and is hashed from disk.
        Failures are returned, not raised: see ``status``/``exit_code``/``ok``.
        """
        h = host or self.client
        if output is None:
            self._curl_seq += 1
            body = self.workdir / "curl" / f"{self._curl_seq}.body"
            keep = False
        else:
            body = Path(output)
            if not body.is_absolute():
                body = self.workdir / body
            keep = True
        body.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "curl", "-sS", "--noproxy", "*", "--max-time", f"{timeout:g}",
            "-o", str(body), "-w", "%{http_code} %{time_total}",
            *extra_args, url,
        ]  # fmt: skip
        cp = self.exec(h, argv, timeout=timeout + 10, check=False)
        parts = cp.stdout.split()
        status = int(parts[0]) if parts and parts[0].isdigit() else 0
        time_total = float(parts[1]) if len(parts) > 1 else 0.0
        if body.exists():
            sha, size = sha256_file(body)
            if not keep:
                body.unlink()
        else:
            sha, size = hashlib.sha256(b"").hexdigest(), 0
        return CurlResult(
            status=status,
            sha256=sha,
            size=size,
            time_total=time_total,
            exit_code=cp.returncode,
            error=cp.stderr.strip(),
            path=body if keep and body.exists() else None,
        )

    # --------------------------------------------------------------- counters

    def interface_bytes(self, host: Host | str) -> dict[str, Counters]:
        """{ifname: Counters} of every interface in HOST's namespace (netlink)."""
        ns = host if isinstance(host, str) else host.ns
        if ns not in self.namespaces:
            raise TestbedError(f"{ns!r} is not a namespace of cluster {self.id}")
        return netlink.link_counters(ns)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cleanup_stale(prefix: str = NS_PREFIX, tmpdir: str | None = None) -> list[str]:
    """Remove namespaces (and workdirs) left by crashed test-bed runs.

    Only names of the form ``<prefix><6 hex>-<role>`` are touched, and a
    cluster whose owner still holds its workdir lock (a live cluster, in this
    or another process) is left alone. Processes still inside a stale
    namespace (started by that run) are killed by PID first. Returns the
    namespaces removed.
    """
    if not re.fullmatch(r"[a-z][a-z0-9]{1,8}", prefix):
        raise ValueError(f"bad prefix {prefix!r}")
    tmp = Path(tmpdir or tempfile.gettempdir())
    pat = re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{6}})-{_ROLE_RE}$")
    by_id: dict[str, list[str]] = {}
    for ns in netlink.netns_list(prefix):
        m = pat.match(ns)
        if m:
            by_id.setdefault(m.group(1), []).append(ns)
    dir_pat = re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{6}})$")
    for d in tmp.iterdir() if tmp.is_dir() else []:
        m = dir_pat.match(d.name)
        if m and d.is_dir():
            by_id.setdefault(m.group(1), [])
    removed: list[str] = []
    for cid, names in sorted(by_id.items()):
        workdir = tmp / f"{prefix}{cid}"
        if _owner_alive(workdir):
            continue
        for ns in names:
            _kill_pids(netlink.netns_pids(ns), 1.0)
        for ns in names:
            if netlink.netns_delete(ns):
                removed.append(ns)
        shutil.rmtree(workdir, ignore_errors=True)
    return removed


def _owner_alive(workdir: Path) -> bool:
    lock = workdir / ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # being created right now (mkdir before lock)? leave young dirs alone
        try:
            return time.time() - workdir.stat().st_mtime < 60
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


