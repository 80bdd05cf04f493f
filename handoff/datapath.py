"""Load, pin and attach the BPF programs of one router or one agent.

Maps are pinned under ``<bpf_dir>/<instance>/`` on a bpffs, and programs are
attached with ``replace`` semantics: a restarted ``arr serve`` or ``arr
agent`` picks up the live maps (and so every connection already handed
off) and swaps its programs in without a gap. Stopping a process leaves the
programs attached on purpose; ``detach`` is an explicit operator action.

Each object also has an ``arr_events`` ring buffer: what its programs saw
that the lifecycle must act on (``events``; handoff/lifecycle.py and
handoff/agent_lifecycle.py read it from their event loops).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from arr import netlink
from handoff.build import object_path
from handoff.instances import forget_owner, record_owner
from handoff.libbpf import BpfMap, BpfObject, RingBuffer
from handoff.ports import PortRange, reservation_text
from handoff.maps import (DEFAULT_CAPACITY, Capture, FLOW_ACTIVE, STAT_NAMES, Event, FlowEntry, FlowKey, MirrorState,
                          ResponseHead, StatIndex, WatchEntry)

log = logging.getLogger("arr.handoff")

DEFAULT_BPF_DIR = "/run/arr/bpf"
_libc = ctypes.CDLL(None, use_errno=True)


class DatapathError(RuntimeError):
    pass


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at PATH, from /proc/self/mountinfo."""
    target = str(path.resolve())
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target:
                found = fields[sep + 1]  # the last mount at a path wins
    return found


def ensure_bpffs(path: str | Path) -> Path:
    """Make sure PATH is a bpffs mount, mounting one if needed.

    Pins live as long as their bpffs mount. ``ip netns exec`` gives a process
    a mount namespace of its own: a bpffs mounted from inside it vanishes
    with the process, so the pins would not survive a restart. Mount it from
    the host's mount namespace first (the test bed does).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if mount_fstype(root) == "bpf":
        return root
    if _libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"cannot mount bpffs at {root}: {os.strerror(err)}")
    log.warning("mounted a bpffs at %s; if this process runs in a private mount namespace "
                "(ip netns exec), pinned maps will not outlive it", root)
    return root


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def default_instance(role: str) -> str:
    """One instance per role and network namespace unless configured otherwise."""
    return f"{role}-{netns_inode()}"


def read_stats(stats: BpfMap) -> dict[str, int]:
    """Per-CPU counters summed over CPUs."""
    ncpu = os.cpu_count() or 1
    totals = {}
    for index, name in enumerate(STAT_NAMES):
        values = (ctypes.c_uint64 * _possible_cpus(ncpu))()
        key = StatIndex(index)
        if stats._lib.bpf_map_lookup_elem(stats.fd, ctypes.byref(key), ctypes.byref(values)) == 0:
            totals[name] = sum(values)
    return totals


def _possible_cpus(fallback: int) -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return fallback
    last = text.split(",")[-1]
    return int(last.split("-")[-1]) + 1


@dataclass
class Attachment:
    ifname: str
    direction: str
    program: str


class Datapath:
    """Programs of one BPF object attached to interfaces, maps pinned."""

    role = ""

    connection_maps: tuple[str, ...] = ()
    """Maps with an entry per handed-off connection: sized by ``capacity``."""

    def __init__(self, bpf_dir: str | Path = DEFAULT_BPF_DIR, instance: str | None = None,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.pin_dir = ensure_bpffs(bpf_dir) / (instance or default_instance(self.role))
        self.capacity = capacity
        self.obj = BpfObject(object_path(self.role), self.pin_dir,
                             capacity={name: capacity for name in self.connection_maps})
        self.stats_map = BpfMap(self.obj.map_fd("arr_stats"), StatIndex, StatIndex)
        self.attached: list[Attachment] = []
        try:  # for `arr conns --instances` (handoff/instances.py); never worth failing for
            record_owner(self.pin_dir.parent, self.pin_dir.name, self.role)
        except OSError as exc:
            log.warning("could not record the owner of %s: %s", self.pin_dir, exc)

    def attach(self, program: str, ifname: str, direction: str) -> None:
        netlink.bpf_attach(None, ifname, direction, self.obj.program_fd(program), program)
        self.attached.append(Attachment(ifname, direction, program))
        log.info("attached %s on %s %s (maps in %s)", program, ifname, direction, self.pin_dir)

    def enable_forwarding(self, ifname: str) -> None:
        """bpf_fib_lookup answers only for interfaces with IPv4 forwarding on."""
        path = Path(f"/proc/sys/net/ipv4/conf/{ifname}/forwarding")
        if path.read_text().strip() != "1":
            path.write_text("1")
            log.info("enabled IPv4 forwarding on %s (needed by bpf_fib_lookup)", ifname)

    def stats(self) -> dict[str, int]:
        """What the programs did (per-CPU counters summed)."""
        return read_stats(self.stats_map)

    def events(self) -> RingBuffer:
        """A reader of the programs' arr_events ring buffer (close it when done):
        ``Event`` records, and on the router ``Capture`` records too."""
        return RingBuffer(self.obj.map_fd("arr_events"), Event, Capture)

    def detach(self) -> None:
        for a in self.attached:
            netlink.bpf_detach(None, a.ifname, a.direction)
        self.attached.clear()

    def close(self) -> None:
        """Forget the object; programs stay attached, maps stay pinned."""
        self.obj.close()

    def unpin(self) -> None:
        """Remove the pinned maps (after detach: connections handed off are lost)."""
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        forget_owner(self.pin_dir.name)


class IngressMap(BpfMap[FlowKey, FlowEntry]):
    """The router's ingress map. Writing an ACTIVE entry (the handoff's step 7)
    also records the client's 4-tuple in the watch entry of its forwarding
    connection, if that entry does not name it yet: the agent's GONE names the
    forwarding connection, and with the client's 4-tuple at hand the router
    ends both entries at once, without a walk (handoff/lifecycle.py).
    ``on_active`` (if set) hears of every such write."""

    watch: BpfMap[FlowKey, WatchEntry] | None = None
    on_active: "Callable[[FlowKey, FlowEntry], None] | None" = None

    def update(self, key: FlowKey, value: FlowEntry, flags: int = 0) -> None:
        super().update(key, value, flags)
        if value.state != FLOW_ACTIVE:
            return
        if self.watch is not None:
            link_client(self.watch, key, value)
        if self.on_active is not None:
            self.on_active(key, value)


def link_client(watch: BpfMap[FlowKey, WatchEntry], client: FlowKey, entry: FlowEntry) -> None:
    """Name CLIENT in the watch entry of ENTRY's forwarding connection."""
    x = entry.x
    forward = FlowKey(x.daddr, x.saddr, x.dport, x.sport)
    found = watch.lookup(forward)
    if found is not None and found.conn_id == entry.conn_id and bytes(found.client) != bytes(client):
        found.client = client
        watch.update(forward, found)


class RouterDatapath(Datapath):
    role = "router"
    connection_maps = ("arr_ingress", "arr_watch")

    def __init__(self, bpf_dir: str | Path = DEFAULT_BPF_DIR, instance: str | None = None,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(bpf_dir, instance, capacity)
        self.watch: BpfMap[FlowKey, WatchEntry] = BpfMap(self.obj.map_fd("arr_watch"), FlowKey, WatchEntry)
        self.ingress: IngressMap = IngressMap(self.obj.map_fd("arr_ingress"), FlowKey, FlowEntry)
        self.ingress.watch = self.watch

    def reserve_ports(self, forward_ports: PortRange) -> None:
        """Keep the kernel from picking forwarding ports for the router's own
        connections (handoff/ports.py says why)."""
        path = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
        wanted = reservation_text(path.read_text(), forward_ports)
        if wanted is not None:
            path.write_text(wanted)
            log.info("reserved forwarding ports %s from the kernel's ephemeral choice "
                     "(net.ipv4.ip_local_reserved_ports = %s)", forward_ports, wanted)

    def attach_interfaces(self, client_ifname: str, target_ifnames: list[str]) -> None:
        # Client packets arrive on the client side; the targets' SYN-ACKs and
        # mirrored ACKs on the target side (often the same interface).
        self.enable_forwarding(client_ifname)
        self.attach("arr_router_ingress", client_ifname, "ingress")
        self.attach_target_interfaces(target_ifnames)

    def attach_target_interfaces(self, target_ifnames: list[str]) -> None:
        """The target side, where not attached yet (also for targets added at
        run time, a reload)."""
        done = {(a.ifname, a.direction) for a in self.attached}
        for ifname in dict.fromkeys(target_ifnames):
            if (ifname, "ingress") not in done:
                self.enable_forwarding(ifname)
                self.attach("arr_router_ingress", ifname, "ingress")
            if (ifname, "egress") not in done:
                self.attach("arr_router_egress", ifname, "egress")


class TargetDatapath(Datapath):
    role = "target"
    connection_maps = ("arr_egress", "arr_mirror", "arr_response")

    def __init__(self, bpf_dir: str | Path = DEFAULT_BPF_DIR, instance: str | None = None,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(bpf_dir, instance, capacity)
        self.egress: BpfMap[FlowKey, FlowEntry] = BpfMap(self.obj.map_fd("arr_egress"), FlowKey, FlowEntry)
        self.mirror: BpfMap[FlowKey, MirrorState] = BpfMap(self.obj.map_fd("arr_mirror"), FlowKey, MirrorState)
        self.responses: BpfMap[FlowKey, ResponseHead] = BpfMap(self.obj.map_fd("arr_response"), FlowKey,
                                                              ResponseHead)

    def attach_interfaces(self, ifnames: list[str]) -> None:
        for ifname in dict.fromkeys(ifnames):
            self.enable_forwarding(ifname)
            self.attach("arr_target_egress", ifname, "egress")
