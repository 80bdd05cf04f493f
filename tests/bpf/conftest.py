"""Shared fixtures of the BPF tests (root, no network traffic leaves the namespace).

* ``bpf_env`` (session): a throw-away namespace with a veth pair ``x0``/``x1``
  (x0 = 10.9.0.1/24, MTU 9000, forwarding on, a fixed MAC), a default route via
  10.9.0.254 and permanent neighbour entries, so ``bpf_fib_lookup`` resolves
  every unicast destination to a known MAC (:meth:`BpfEnv.next_hop`); the
  router and target objects loaded once, with their maps; :meth:`BpfEnv.run`
  runs a program on a frame with a given map state (from a thread that lives
  in the namespace, which the FIB lookup needs); :meth:`BpfEnv.sent` returns
  the IPv4 frames that arrived on x1 (clones redirected to x0 come out there).
* ``bpf_ns``: (namespace, ifindex of x0) for the example-based tests.
* ``eth()``, ``skb_ctx()``: frames with explicit MACs (a bare ``Ether()`` makes
  scapy ARP) and the ``__sk_buff`` context test_run gets.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import pytest
from scapy.layers.l2 import Ether

from arr import netlink
from handoff.build import object_path
from handoff.datapath import read_stats
from handoff.libbpf import BpfMap, BpfObject, test_run
from handoff.maps import FlowEntry, FlowKey, MirrorState, ResponseHead, StatIndex, WatchEntry

T = TypeVar("T")

X0_IP = "10.9.0.1"
X0_MAC = "02:a7:70:00:00:01"
GATEWAY = ("10.9.0.254", "02:a7:70:00:00:fe")
ON_LINK = {"10.9.0.2": "02:a7:70:00:00:02", "10.9.0.11": "02:a7:70:00:00:0b",
           "10.9.0.12": "02:a7:70:00:00:0c"}
"""Permanent neighbours on x0's subnet; everything else goes via GATEWAY."""


def eth() -> Ether:
    """Explicit MACs: a bare Ether() makes scapy resolve one (ARP), never wanted here."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def skb_ctx(ifindex: int) -> bytes:
    """A struct __sk_buff for test_run with only ifindex set (offset 40)."""
    ctx = bytearray(192)
    ctx[40:44] = ifindex.to_bytes(4, "little")
    return bytes(ctx)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True)


@dataclass
class Run:
    """What one BPF_PROG_TEST_RUN did."""

    verdict: int
    out: bytes
    maps: dict[str, dict[FlowKey, Any]]
    """Contents of the object's hash maps afterwards, by map name."""
    stats: dict[str, int] = field(default_factory=dict)
    """Counters this run added (per-CPU sums, after minus before)."""


class Loaded:
    """One object, loaded once, with typed access to its maps."""

    def __init__(self, name: str, maps: Mapping[str, type], stats: str) -> None:
        self.obj = BpfObject(object_path(name))
        self.maps = {n: BpfMap(self.obj.map_fd(n), FlowKey, v) for n, v in maps.items()}
        self.stats = BpfMap(self.obj.map_fd(stats), StatIndex, StatIndex)
        self._progs: dict[str, int] = {}

    def prog(self, name: str) -> int:
        if name not in self._progs:
            self._progs[name] = self.obj.program_fd(name)
        return self._progs[name]


PROGRAMS = {"arr_router_ingress": "router", "arr_router_egress": "router",
            "arr_target_egress": "target"}


class BpfEnv:
    def __init__(self, ns: str, ifindex: int) -> None:
        self.ns = ns
        self.ifindex = ifindex
        self.ctx = skb_ctx(ifindex)
        self._capture: socket.socket | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=netlink.join_netns, initargs=(ns,))
        self.objects = self.call(lambda: {
            "router": Loaded("router", {"arr_ingress": FlowEntry, "arr_watch": WatchEntry},
                             "arr_stats"),
            "target": Loaded("target", {"arr_egress": FlowEntry, "arr_mirror": MirrorState,
                                        "arr_response": ResponseHead}, "arr_stats"),
        })

    def sent(self, wait: float = 0.0) -> list[bytes]:
        """IPv4 frames that arrived on x1 since the last call; waits up to
        ``wait`` seconds for the first one."""
        if self._capture is None:
            def open_capture() -> socket.socket:
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
                s.bind(("x1", 0))
                s.setblocking(False)
                return s
            self._capture = self.call(open_capture)
        frames: list[bytes] = []
        while True:
            ready, _, _ = select.select([self._capture], [], [], 0 if frames else wait)
            if not ready:
                return frames
            frame = self._capture.recv(65536)
            if frame[12:14] == b"\x08\x00":
                frames.append(frame)

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the worker thread that lives in the namespace."""
        return self._pool.submit(fn).result()

    @staticmethod
    def next_hop(daddr: str) -> tuple[bytes, bytes]:
        """(dst MAC, src MAC) the FIB lookup gives for a unicast destination."""
        return mac_bytes(ON_LINK.get(daddr, GATEWAY[1])), mac_bytes(X0_MAC)

    def run(self, program: str, frame: bytes, state: Mapping[str, Mapping[FlowKey, Any]] | None = None,
            *, repeat: int = 1) -> Run:
        """Run ``program`` on ``frame`` after setting its object's hash maps to
        exactly ``state`` (map name -> {key: value}; maps not named are emptied)."""
        loaded = self.objects[PROGRAMS[program]]
        state = state or {}
        unknown = set(state) - set(loaded.maps)
        if unknown:
            raise KeyError(f"{program} has no maps {sorted(unknown)}")

        def body() -> Run:
            for name, bpf_map in loaded.maps.items():
                for key in bpf_map.keys():
                    bpf_map.delete(key)
                for key, value in state.get(name, {}).items():
                    bpf_map.update(key, value)
            before = read_stats(loaded.stats)
            verdict, out = test_run(loaded.prog(program), frame, ctx=self.ctx, repeat=repeat)
            after = read_stats(loaded.stats)
            return Run(verdict, out, {n: dict(m.items()) for n, m in loaded.maps.items()},
                       {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)})
        return self.call(body)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.close()
        self._pool.shutdown(wait=True)
        for loaded in self.objects.values():
            loaded.obj.close()


@pytest.fixture(scope="session")
def bpf_env():
    if os.geteuid() != 0:
        pytest.fail("BPF tests need root (CI runs as root); they are not skipped", pytrace=False)
    ns = f"arrbpf{uuid.uuid4().hex[:6]}"
    netlink.netns_create(ns)
    env = None
    try:
        netlink.veth_create(ns, "x0", ns, "x1")
        _ip(ns, "link", "set", "dev", "x0", "address", X0_MAC)
        for ifname in ("x0", "x1"):
            netlink.link_set_mtu(ns, ifname, 9000)
        for ifname in ("lo", "x0", "x1"):
            netlink.link_up(ns, ifname)
        netlink.addr_add(ns, "x0", f"{X0_IP}/24")
        netlink.sysctl_set(ns, {"net.ipv4.conf.all.forwarding": 1, "net.ipv4.conf.x0.forwarding": 1})
        for ip, mac in [GATEWAY, *ON_LINK.items()]:
            _ip(ns, "neigh", "replace", ip, "lladdr", mac, "nud", "permanent", "dev", "x0")
        _ip(ns, "route", "add", "default", "via", GATEWAY[0], "dev", "x0")
        env = BpfEnv(ns, netlink.link_index(ns, "x0"))
        yield env
    finally:
        if env is not None:
            env.close()
        netlink.netns_delete(ns)


@pytest.fixture(scope="session")
def bpf_ns(bpf_env):
    return bpf_env.ns, bpf_env.ifindex
