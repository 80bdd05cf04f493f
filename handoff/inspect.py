"""``arr conns``: the handed-off connections, read from the pinned maps.

Works whether or not ``arr serve``/``arr agent`` runs (the maps outlive them):
these entries are the only observability of connections the router no
longer carries. ``Connection`` names the four endpoints of an entry the same
way on both sides (client, service address, forwarding address, target);
selecting and summing them is pure (``select``, ``summarise``).
``--instances`` lists the pin directories and their owners
(handoff/instances.py); ``--remove-orphaned`` unpins those whose network
namespace is gone.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from handoff.datapath import default_instance
from handoff.instances import ORPHANED, list_instances, read_owner, remove_instance
from handoff.libbpf import BpfError, BpfMap
from handoff.maps import FlowEntry, FlowKey, FlowSummary

MAPS = {"router": "arr_ingress", "agent": "arr_egress"}
ROLES = {"router": "router", "agent": "target"}
STATES = ("hold", "active", "ended", "takeback")


@dataclass(frozen=True)
class Connection:
    """One map entry with its endpoints named.

    The router's ingress entry is keyed by what the client sends
    (client -> service) and rewrites it to forward -> target; the agent's
    egress entry is keyed by what the target's server sends
    (target -> forward) and rewrites it to service -> client."""

    side: str
    client_ip: str
    client_port: int
    service_ip: str
    service_port: int
    forward_ip: str
    forward_port: int
    target_ip: str
    target_port: int
    state: str
    flags: tuple[str, ...]
    packets: int
    bytes: int
    idle_s: float | None
    errors: int

    @classmethod
    def of(cls, side: str, flow: FlowSummary) -> "Connection":
        if side == "router":
            client, service = flow.key
            forward, target = flow.to
        else:
            target, forward = flow.key
            service, client = flow.to
        return cls(side=side, client_ip=client[0], client_port=client[1], service_ip=service[0],
                   service_port=service[1], forward_ip=forward[0], forward_port=forward[1],
                   target_ip=target[0], target_port=target[1], state=flow.state, flags=flow.flags,
                   packets=flow.packets, bytes=flow.bytes, idle_s=flow.idle_s, errors=flow.errors)


@dataclass(frozen=True)
class Selection:
    """``--client``, ``--target`` and ``--state``: all given must match."""

    client: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    client_port: int | None = None
    target_ip: str | None = None
    target_port: int | None = None
    states: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, client: str | None, target: str | None, states: Iterable[str] = ()) -> "Selection":
        net, cport = None, None
        if client:
            text = client
            if text.count(":") == 1 and "/" not in text:  # ip:port
                text, port_text = text.split(":")
                cport = _port(port_text, "--client")
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"--client: {client!r} is not an address, a prefix or address:port") from None
        tip, tport = None, None
        if target:
            tip, _, port_text = target.rpartition(":") if ":" in target else (target, "", "")
            try:
                ipaddress.ip_address(tip)
            except ValueError:
                raise ValueError(f"--target: {target!r} is not an address or address:port") from None
            tport = _port(port_text, "--target") if port_text else None
        unknown = set(states) - set(STATES)
        if unknown:
            raise ValueError(f"--state: {sorted(unknown)[0]!r} is not one of {', '.join(STATES)}")
        return cls(client=net, client_port=cport, target_ip=tip, target_port=tport, states=frozenset(states))

    def matches(self, conn: Connection) -> bool:
        if self.client is not None and ipaddress.ip_address(conn.client_ip) not in self.client:
            return False
        if self.client_port is not None and conn.client_port != self.client_port:
            return False
        if self.target_ip is not None and conn.target_ip != self.target_ip:
            return False
        if self.target_port is not None and conn.target_port != self.target_port:
            return False
        return not self.states or conn.state in self.states


def _port(text: str, option: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{option}: port {text!r} is not a number in 1-65535")
    return int(text)


def select(conns: Iterable[Connection], selection: Selection) -> list[Connection]:
    return [c for c in conns if selection.matches(c)]


def summarise(conns: Iterable[Connection]) -> dict[str, object]:
    conns = list(conns)
    return {
        "connections": len(conns),
        "by_state": dict(sorted(collections.Counter(c.state for c in conns).items())),
        "by_target": dict(sorted(collections.Counter(f"{c.target_ip}:{c.target_port}" for c in conns).items())),
        "clients": len({c.client_ip for c in conns}),
        "packets": sum(c.packets for c in conns),
        "bytes": sum(c.bytes for c in conns),
    }


def local_instance(bpf_dir: str | Path, side: str) -> str:
    """The instance a router or agent of this network namespace pinned (its
    owner record says so, whatever ``handoff.instance`` named it), else the
    default name."""
    netns = os.stat("/proc/self/ns/net").st_ino
    for inst in list_instances(bpf_dir):
        record = read_owner(inst.name)
        if record is not None and record.netns_inode == netns and record.role == ROLES[side]:
            return inst.name
    return default_instance(ROLES[side])


def read_connections(bpf_dir: str | Path, side: str, instance: str | None = None) -> list[Connection]:
    pin_dir = Path(bpf_dir) / (instance or local_instance(bpf_dir, side))
    flows = BpfMap.pinned(pin_dir / MAPS[side], FlowKey, FlowEntry)
    try:
        now = time.monotonic_ns()
        return [Connection.of(side, FlowSummary.of(key, entry, now)) for key, entry in flows.items()]
    finally:
        flows.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--side", choices=("router", "agent"), default="router")
    parser.add_argument("--bpf-dir", default="/run/arr/bpf")
    parser.add_argument("--instance", help="pinned maps' instance (default: the one this netns's router "
                        "or agent pinned, by its owner record)")
    parser.add_argument("--client", help="only connections of this client: address, prefix or address:port")
    parser.add_argument("--target", help="only connections to this target: address or address:port")
    parser.add_argument("--state", action="append", choices=STATES, default=[],
                        help="only entries in this state (repeatable)")
    parser.add_argument("-s", "--summary", action="store_true", help="counts instead of the list")
    parser.add_argument("--instances", action="store_true",
                        help="list the pinned instances under --bpf-dir and whether their owner lives")
    parser.add_argument("--remove-orphaned", action="store_true",
                        help="unpin instances whose network namespace is gone (nothing can use them)")
    parser.add_argument("--json", action="store_true")


def _instances(args: argparse.Namespace) -> int:
    found = list_instances(args.bpf_dir)
    removed = []
    if args.remove_orphaned:
        for inst in found:
            if inst.status == ORPHANED:
                remove_instance(inst)
                removed.append(inst.name)
    if args.json:
        print(json.dumps({"instances": [asdict(i) for i in found], "removed": removed}, indent=2))
        return 0
    print(f"{len(found)} instance(s) under {args.bpf_dir}")
    for inst in found:
        pid = str(inst.owner_pid) if inst.owner_pid else "-"
        gone = "  (removed)" if inst.name in removed else ""
        print(f"{inst.name:<40} {inst.role or '?':<7} {inst.status:<9} pid {pid:<8}{gone}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.instances or args.remove_orphaned:
        return _instances(args)
    try:
        selection = Selection.parse(args.client, args.target, args.state)
    except ValueError as exc:
        print(f"arr conns: {exc}", file=sys.stderr)
        return 2
    try:
        conns = select(read_connections(args.bpf_dir, args.side, args.instance), selection)
    except BpfError as exc:
        print(f"arr conns: no pinned {args.side} maps ({exc})", file=sys.stderr)
        return 1
    if args.summary:
        summary = summarise(conns)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"{summary['connections']} handed-off connection(s) on the {args.side}, "
                  f"{summary['clients']} client(s), {summary['packets']} packets, {summary['bytes']} bytes")
            for title in ("by_state", "by_target"):
                counts = summary[title]
                assert isinstance(counts, dict)
                print(f"  {title.replace('_', ' ')}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "-"))
        return 0
    if args.json:
        print(json.dumps([asdict(c) for c in conns], indent=2))
        return 0
    direction = "client -> target" if args.side == "router" else "target -> client"
    print(f"{len(conns)} handed-off connection(s) on the {args.side} ({direction} counters)")
    if conns:
        print(f"{'client':<22} {'service':<22} {'forward':<22} {'target':<22} {'state':<8} {'flags':<8} "
              f"{'packets':>9} {'bytes':>12} {'idle s':>7}")
    for c in sorted(conns, key=lambda c: (c.client_ip, c.client_port)):
        idle = f"{c.idle_s:.1f}" if c.idle_s is not None else "-"
        print(f"{c.client_ip + ':' + str(c.client_port):<22} {c.service_ip + ':' + str(c.service_port):<22} "
              f"{c.forward_ip + ':' + str(c.forward_port):<22} {c.target_ip + ':' + str(c.target_port):<22} "
              f"{c.state:<8} {','.join(c.flags) or '-':<8} {c.packets:>9} {c.bytes:>12} {idle:>7}")
    return 0
