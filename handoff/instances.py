"""Who owns a directory of pinned maps, and whether anyone still can.

Pins outlive their process on purpose (a restarted router or agent picks its
connections up again, README "Running the router and the agents"), so a dead
owner alone does not make an instance stale. What does: the network
namespace it served is gone, so no process can ever attach its programs
again. Each ``Datapath`` (handoff/datapath.py) records its owner in
``OWNERS_DIR/<instance>.json``, beside bpffs, which holds no regular files.

``classify`` is pure; ``observe`` gathers the facts it needs from /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OWNERS_DIR = Path(os.environ.get("ARR_OWNERS_DIR", "/run/arr/owners"))

RUNNING = "running"      # the owner process lives, in the namespace it recorded
STOPPED = "stopped"      # the owner is gone, its namespace lives: a restart picks the pins up
ORPHANED = "orphaned"    # the namespace is gone: nothing can use these entries again
UNKNOWN = "unknown"      # no owner record (pins of an older arr, or made by hand)


@dataclass(frozen=True)
class OwnerRecord:
    instance: str
    role: str
    pid: int
    netns_inode: int
    bpf_dir: str
    started: float


@dataclass(frozen=True)
class HostFacts:
    """What /proc says right now: live PIDs with their namespace inodes, and
    every namespace inode something still holds (a process or a bind mount)."""

    process_netns: dict[int, int]
    live_netns: frozenset[int]


@dataclass(frozen=True)
class Instance:
    name: str
    pin_dir: str
    status: str
    role: str | None
    owner_pid: int | None
    maps: tuple[str, ...]


def classify(record: OwnerRecord | None, facts: HostFacts) -> str:
    if record is None:
        return UNKNOWN
    if facts.process_netns.get(record.pid) == record.netns_inode:
        return RUNNING
    if record.netns_inode in facts.live_netns:
        return STOPPED
    return ORPHANED


def record_owner(bpf_dir: str | Path, instance: str, role: str, *, owners_dir: Path | None = None) -> None:
    """Called by the process that pins (or re-opens) an instance's maps."""
    directory = owners_dir or OWNERS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    record = OwnerRecord(instance=instance, role=role, pid=os.getpid(),
                         netns_inode=os.stat("/proc/self/ns/net").st_ino,
                         bpf_dir=str(bpf_dir), started=time.time())
    tmp = directory / f".{instance}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(directory / f"{instance}.json")


def read_owner(instance: str, *, owners_dir: Path | None = None) -> OwnerRecord | None:
    try:
        data = json.loads(((owners_dir or OWNERS_DIR) / f"{instance}.json").read_text())
        return OwnerRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def observe() -> HostFacts:
    process_netns: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                process_netns[int(entry.name)] = os.stat(entry / "ns" / "net").st_ino
            except OSError:
                continue  # gone meanwhile, or a kernel thread we may not look at
    held = set(process_netns.values())
    for netns_dir in (Path("/run/netns"), Path("/var/run/netns")):
        if netns_dir.is_dir():
            for name in netns_dir.iterdir():
                try:
                    held.add(os.stat(name).st_ino)
                except OSError:
                    continue
    return HostFacts(process_netns=process_netns, live_netns=frozenset(held))


def list_instances(bpf_dir: str | Path, *, facts: HostFacts | None = None,
                   owners_dir: Path | None = None) -> list[Instance]:
    root = Path(bpf_dir)
    if not root.is_dir():
        return []
    facts = facts or observe()
    found = []
    for pin_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        maps = tuple(sorted(p.name for p in pin_dir.iterdir()))
        if not any(m.startswith("arr_") for m in maps):
            continue
        record = read_owner(pin_dir.name, owners_dir=owners_dir)
        if record is not None and Path(record.bpf_dir) != root:
            record = None  # a namesake under another bpf_dir
        role = record.role if record else ("router" if "arr_ingress" in maps else
                                           "target" if "arr_egress" in maps else None)
        found.append(Instance(name=pin_dir.name, pin_dir=str(pin_dir), status=classify(record, facts),
                              role=role, owner_pid=record.pid if record else None, maps=maps))
    return found


def forget_owner(instance: str, *, owners_dir: Path | None = None) -> None:
    ((owners_dir or OWNERS_DIR) / f"{instance}.json").unlink(missing_ok=True)


def remove_instance(instance: Instance, *, owners_dir: Path | None = None) -> None:
    """Unpin an instance's maps and forget its owner. Only for instances
    nothing can use (``ORPHANED``), or that the operator names explicitly."""
    shutil.rmtree(instance.pin_dir, ignore_errors=True)
    forget_owner(instance.name, owners_dir=owners_dir)
