"""handoff/maps.py mirrors arr_handoff.h: sizes and offsets checked against BTF."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

from handoff.build import object_path
from handoff import maps

STRUCTS = {"flow_key": maps.FlowKey, "xlate": maps.Xlate, "flow_entry": maps.FlowEntry,
           "watch_entry": maps.WatchEntry, "mirror_state": maps.MirrorState}


def btf_structs(program: str) -> dict[str, tuple[int, dict[str, int]]]:
    """{struct: (size, {member: byte offset})} from the object's BTF (bpftool)."""
    tool = shutil.which("bpftool") or pytest.fail("bpftool is needed (apt-get install bpftool)")
    text = subprocess.run([tool, "btf", "dump", "file", str(object_path(program)), "format", "raw"],
                          capture_output=True, text=True, check=True).stdout
    found: dict[str, tuple[int, dict[str, int]]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line)
        if head:
            current = head.group(1)
            found[current] = (int(head.group(2)), {})
            continue
        member = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if member and current:
            found[current][1][member.group(1)] = int(member.group(2)) // 8
        elif not line.startswith("\t") and not line.startswith(" "):
            current = None
    return found


@pytest.mark.parametrize("program", ["router", "target"])
def test_ctypes_layouts_match_btf(program):
    btf = btf_structs(program)
    checked = 0
    for name, struct in STRUCTS.items():
        if name not in btf:
            continue
        size, members = btf[name]
        assert ctypes.sizeof(struct) == size, name
        for field, offset in members.items():
            assert getattr(struct, field).offset == offset, f"{name}.{field}"
        checked += 1
    assert checked >= 3
