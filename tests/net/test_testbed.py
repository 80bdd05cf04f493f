"""The network test bed itself: topologies, file serving, cleanup, counters."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from arr import netlink
from arr.testbed import Cluster, ClusterSpec, TestbedError, cleanup_stale
from arr.testbed import nginx as tb_nginx
from arr.testbed.files import content_blocks, write_file

pytestmark = pytest.mark.net


def ns_list() -> list[str]:
    """Namespace names as `ip netns list` shows them (independent of arr.netlink)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def assert_gone(c: Cluster, pids: list[int] = ()) -> None:
    left = set(c.namespaces) & set(ns_list())
    assert not left, f"namespaces left behind: {sorted(left)}"
    assert not c.workdir.exists(), f"workdir left behind: {c.workdir}"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} still exists"
    assert c.leftovers() == []

MiB = 1 << 20
FILES = {"1k": 1024, "1m": MiB}
BIG = {"1k": 1024, "1m": MiB, "64m": 64 * MiB}


def _get_all(c: Cluster) -> None:
    for i, t in enumerate(c.targets):
        r = c.curl(c.target_url(i, "/whoami"), output=f"whoami-{i}")
        assert r.ok and r.status == 200, r
        assert r.path is not None and r.path.read_text() == f"{t.name}\n"
        for name, info in c.files.items():
            r = c.curl(c.target_url(i, info.url_path))
            assert (r.status, r.exit_code) == (200, 0), r
            assert r.size == info.size, (name, r)
            assert r.sha256 == info.sha256, (name, r)
        log = c.nginx_log(i)
        for name, info in c.files.items():
            hits = [line for line in log if f'"GET {info.url_path} HTTP/1.1" 200 {info.size} ' in line]
            assert hits, (name, log)
            assert hits[-1].startswith(f"{c.client.ip} "), hits[-1]
        assert any('"GET /whoami HTTP/1.1" 200' in line for line in log), log


@pytest.mark.parametrize("topology", ["bridge", "gateway"])
def test_files_and_whoami_each_target(cluster, topology):
    c = cluster(targets=2, topology=topology, files=BIG)
    assert len(c.targets) == 2 and len({t.ns for t in c.hosts}) == len(c.hosts)
    assert c.vip == c.router.ip
    assert (c.gateway is None) == (topology == "bridge")
    _get_all(c)
    h = c.curl(c.target_url(1, "/health"), output="health")
    assert h.status == 200 and h.path is not None and h.path.read_text() == "ok\n"
    assert c.curl(c.target_url(0, "/files/nope")).status == 404


def test_gateway_routing(cluster):
    c = cluster(targets=2, topology="gateway", files=FILES)
    gw = c.gateway
    assert gw is not None
    client_net = ipaddr_net(c.client)
    assert c.client.ip.rsplit(".", 1)[0] != c.router.ip.rsplit(".", 1)[0]
    # client: default via the gateway
    routes = netlink.routes(c.client.ns)
    assert any(r["dst"] == "default" and r["gateway"] == c.gateway_client_ip for r in routes), routes
    # router and targets: client subnet via the gateway, never via the router
    for h in [c.router, *c.targets]:
        routes = netlink.routes(h.ns)
        via = [r["gateway"] for r in routes if f"{r['dst']}/{r['dst_len']}" == client_net]
        assert via == [gw.ip], (h.name, routes)
    # forwarding on in the gateway only
    assert netlink.sysctl_get(gw.ns, "net.ipv4.ip_forward") == "1"
    for h in [c.client, c.router, *c.targets]:
        assert netlink.sysctl_get(h.ns, "net.ipv4.ip_forward") == "0"
    # the router reaches the client through the gateway too
    cp = c.exec(c.router, ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}",
                           c.target_url(0, "/whoami")])  # fmt: skip
    assert cp.stdout == "200"


def ipaddr_net(h) -> str:
    import ipaddress

    return str(ipaddress.ip_interface(h.cidr).network)


def test_loopback_up_and_ipv6_off(cluster):
    c = cluster(targets=1, topology="gateway", files=FILES)
    for ns in c.namespaces:
        cp = c.exec(ns, ["ip", "-o", "link", "show", "lo"])
        assert "UP" in cp.stdout.split(">")[0], (ns, cp.stdout)
        assert netlink.sysctl_get(ns, "net.ipv6.conf.all.disable_ipv6") == "1"


def test_cleanup_after_with_block(netbed):
    c = Cluster(ClusterSpec(targets=2, files=FILES))
    with c:
        names = list(c.namespaces)
        pids = list(c.nginx_pids().values())
        sleeper = c.popen(c.client, ["sleep", "300"])
        assert set(names) <= set(ns_list())
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)
        assert c.workdir.is_dir()
    assert sleeper.returncode is not None
    assert_gone(c, pids + [sleeper.pid])
    c.close()  # idempotent


def test_cleanup_after_exception_in_body(netbed):
    c = Cluster(ClusterSpec(targets=1, topology="gateway", files=FILES))
    pids: list[int] = []
    with pytest.raises(ZeroDivisionError):
        with c:
            pids = list(c.nginx_pids().values())
            assert pids
            1 / 0  # noqa: B018
    assert_gone(c, pids)


def test_cleanup_after_keyboard_interrupt_in_body(netbed):
    c = Cluster(ClusterSpec(targets=1, files=FILES))
    with pytest.raises(KeyboardInterrupt):
        with c:
            pids = list(c.nginx_pids().values())
            raise KeyboardInterrupt
    assert_gone(c, pids)


def test_cleanup_after_failed_build(netbed, monkeypatch):
    monkeypatch.setattr(tb_nginx, "NGINX_BIN", "/bin/false")
    c = Cluster(ClusterSpec(targets=2, files=FILES))
    with pytest.raises(TestbedError, match="nginx for t0 .* exited"):
        with c:
            pytest.fail("body must not run")
    assert c.namespaces  # the build got as far as creating them
    assert_gone(c)


def test_stop_and_start_target(cluster):
    c = cluster(targets=2, files=FILES)
    url = c.target_url(0, c.files["1k"].url_path)
    assert c.curl(url).status == 200
    old = c.nginx_pids()[0]
    c.stop_target(0)
    assert not os.path.exists(f"/proc/{old}")
    assert 0 not in c.nginx_pids()
    r = c.curl(url, timeout=5)
    assert not r.ok and r.status == 0 and r.exit_code == 7, r  # connection refused
    assert c.curl(c.target_url(1, "/whoami")).status == 200  # the other one is unaffected
    c.start_target(0)
    assert c.nginx_pids()[0] != old
    r = c.curl(url)
    assert r.status == 200 and r.sha256 == c.files["1k"].sha256


def test_keepalive_reuses_connection(cluster):
    c = cluster(targets=1, files=FILES)
    url = c.target_url(0, c.files["1k"].url_path)
    c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-o", "/dev/null", url, url])
    lines = [ln for ln in c.nginx_log(0) if "/files/1k" in ln]
    assert len(lines) == 2
    conn = [ln.split()[-2] for ln in lines]
    reqs = [ln.split()[-1] for ln in lines]
    assert conn[0] == conn[1] and reqs == ["1", "2"], lines


@pytest.mark.parametrize("topology", ["bridge", "gateway"])
def test_interface_bytes_grow_on_path(cluster, topology):
    c = cluster(targets=2, topology=topology, files=FILES)
    size = c.files["1m"].size
    watch = [c.client, c.router, c.targets[0], c.targets[1], c.switch_ns] + ([c.gateway] if c.gateway else [])

    def snap():
        return {(h if isinstance(h, str) else h.ns): c.interface_bytes(h) for h in watch}

    before = snap()
    r = c.curl(c.target_url(0, c.files["1m"].url_path))
    assert r.status == 200 and r.sha256 == c.files["1m"].sha256
    after = snap()

    def delta(h, ifname):
        ns = h if isinstance(h, str) else h.ns
        return after[ns][ifname] - before[ns][ifname]

    t0, t1 = c.targets
    assert delta(t0, "eth0").tx_bytes >= size
    assert delta(c.client, "eth0").rx_bytes >= size
    assert delta(c.client, "eth0").tx_packets > 0 and delta(t0, "eth0").rx_packets > 0
    assert delta(c.switch_ns, f"v-{t0.name}").rx_bytes >= size  # bridge port, from t0
    if c.gateway is not None:
        assert delta(c.gateway, "eth0").rx_bytes >= size
        assert delta(c.gateway, "eth1").tx_bytes >= size
        assert delta(c.switch_ns, "v-gw").tx_bytes >= size
    else:
        assert delta(c.switch_ns, "v-client").tx_bytes >= size
    # the direct path does not touch the router or the other target
    assert delta(c.router, "eth0").rx_bytes < size // 10
    assert delta(t1, "eth0").rx_bytes < size // 10


def test_parallel_clusters_do_not_clash(cluster):
    a = cluster(targets=1, files=FILES)
    b = cluster(targets=1, topology="gateway", files=FILES)
    assert not set(a.namespaces) & set(b.namespaces)
    assert a.workdir != b.workdir
    for c in (a, b):
        r = c.curl(c.target_url(0, c.files["1m"].url_path))
        assert r.status == 200 and r.sha256 == c.files["1m"].sha256


def test_exec_popen_and_port_open(cluster):
    c = cluster(targets=1, files=FILES)
    cp = c.exec(c.targets[0], ["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
    assert f"{c.targets[0].ip}/24" in cp.stdout
    with pytest.raises(subprocess.CalledProcessError, match="stderr"):
        c.exec(c.client, ["ip", "link", "show", "nope0"])
    assert c.exec(c.client, ["false"], check=False).returncode == 1
    assert c.port_open(c.client, c.targets[0].ip, c.spec.target_port)
    assert not c.port_open(c.client, c.targets[0].ip, c.spec.target_port + 1)
    p = c.popen(c.client, ["sleep", "300"])
    assert c.stop_process(p) == -signal.SIGTERM
    with pytest.raises(TestbedError):
        c.exec("not-ours", ["true"])


def test_sysctls_stay_inside_namespaces(cluster):
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        root_before = f.read()
    my_ns = os.stat("/proc/thread-self/ns/net").st_ino
    c = cluster(targets=1, topology="gateway", files=FILES)
    assert netlink.sysctl_get(c.gateway.ns, "net.ipv4.ip_forward") == "1"
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read() == root_before
    # this thread never left the root namespace
    assert os.stat("/proc/thread-self/ns/net").st_ino == my_ns
    assert os.stat("/proc/self/ns/net").st_ino == my_ns


def test_cleanup_stale_removes_only_dead_prefixed(cluster):
    live = cluster(targets=1, files=FILES)
    stale = [f"arrtb{os.urandom(3).hex()}-{role}" for role in ("sw", "t0")]
    for ns in stale:
        netlink.netns_create(ns)
    other = f"arrtbx{os.urandom(2).hex()}"  # our prefix, but not our pattern
    netlink.netns_create(other)
    # a process left running in a stale namespace (as after a crash)
    leftover = subprocess.Popen(["ip", "netns", "exec", stale[1], "sleep", "300"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while leftover.pid not in netlink.netns_pids(stale[1]) and time.monotonic() < deadline:
            time.sleep(0.02)
        removed = cleanup_stale()
        assert sorted(removed) == sorted(stale)
        assert leftover.wait(timeout=5) is not None
        names = ns_list()
        assert not set(stale) & set(names)
        assert other in names
        assert set(live.namespaces) <= set(names)  # a live cluster is never touched
        assert live.curl(live.target_url(0, "/health")).status == 200
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        for ns in stale + [other]:
            netlink.netns_delete(ns)


def test_files_are_deterministic_and_fast(tmp_path):
    t = time.monotonic()
    info = write_file(tmp_path, "64m", 64 * MiB)
    elapsed = time.monotonic() - t
    (tmp_path / "b").mkdir()
    again = write_file(tmp_path / "b", "64m", 64 * MiB)
    assert info.sha256 == again.sha256 and info.size == 64 * MiB == os.path.getsize(info.path)
    assert info.url_path == "/files/64m"
    assert elapsed < 3.0, elapsed  # ~0.4 s here; generous for slow CI
    assert b"".join(content_blocks("x", 3000)) == b"".join(content_blocks("x", 3000))
    assert b"".join(content_blocks("x", 3000)) != b"".join(content_blocks("y", 3000))
