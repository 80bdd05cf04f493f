"""``arr conns``: the handed-off connections, read from the pinned maps.

Works whether or not ``arr serve``/``arr agent`` runs (the maps outlive them):
these entries are the only observability of connections the router no
longer carries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from handoff.datapath import default_instance
from handoff.libbpf import BpfError, BpfMap
from handoff.maps import FlowEntry, FlowKey, FlowSummary

MAPS = {"router": "arr_ingress", "agent": "arr_egress"}
ROLES = {"router": "router", "agent": "target"}


def read_connections(bpf_dir: str | Path, side: str, instance: str | None = None) -> list[FlowSummary]:
    pin_dir = Path(bpf_dir) / (instance or default_instance(ROLES[side]))
    flows = BpfMap.pinned(pin_dir / MAPS[side], FlowKey, FlowEntry)
    try:
        now = time.monotonic_ns()
        return [FlowSummary.of(key, entry, now) for key, entry in flows.items()]
    finally:
        flows.close()


def _endpoint(pair: tuple[str, int]) -> str:
    return f"{pair[0]}:{pair[1]}"


def main(args: argparse.Namespace) -> int:
    try:
        flows = read_connections(args.bpf_dir, args.side, args.instance)
    except BpfError as exc:
        print(f"arr conns: no pinned {args.side} maps ({exc})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([asdict(f) for f in flows], indent=2))
        return 0
    direction = "client -> target" if args.side == "router" else "target -> client"
    print(f"{len(flows)} handed-off connection(s) on the {args.side} ({direction} counters)")
    if flows:
        print(f"{'seen as':<44} {'rewritten to':<44} {'state':<7} {'flags':<8} "
              f"{'packets':>9} {'bytes':>12} {'idle s':>7}")
    for f in sorted(flows, key=lambda f: f.key):
        seen = f"{_endpoint(f.key[0])} -> {_endpoint(f.key[1])}"
        to = f"{_endpoint(f.to[0])} -> {_endpoint(f.to[1])}"
        idle = f"{f.idle_s:.1f}" if f.idle_s is not None else "-"
        print(f"{seen:<44} {to:<44} {f.state:<7} {','.join(f.flags) or '-':<8} "
              f"{f.packets:>9} {f.bytes:>12} {idle:>7}")
    return 0
