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
           "watch_entry": maps.WatchEntry, "mirror_state": maps.MirrorState, "arr_event": maps.Event,
           "arr_capture": maps.Capture, "ack_shift": maps.AckShiftState}


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


def test_constants_shared_with_the_header():
    """Numbers the loader and the lifecycle use, named once in the headers
    (arr_consts.h, arr_structs.h) and mirrored by handoff/maps.py."""
    from handoff.build import SOURCE_DIR

    text = "\n".join(h.read_text() for h in sorted(SOURCE_DIR.glob("*.h")))

    def define(name: str) -> str:
        found = re.search(rf"#define {name} (.+?)(?:\s*/\*.*)?$", text, re.M)
        assert found, name
        return found.group(1).strip()

    assert define("ARR_DEFAULT_CAPACITY") == str(maps.DEFAULT_CAPACITY)
    assert eval(define("ARR_EVENTS_BYTES")) == maps.EVENTS_BYTES
    assert define("ARR_MIRROR_TAIL_ACKS") == str(maps.MIRROR_TAIL_ACKS)
    assert eval(define("ARR_MIRROR_TAIL_NS").replace("ULL", "")) == maps.MIRROR_TAIL_NS
    kinds = dict(re.findall(r"(ARR_EV_\w+) = (\d+)", text))
    assert {k: int(v) for k, v in kinds.items()} == {
        "ARR_EV_FIN": maps.EV_FIN, "ARR_EV_RST": maps.EV_RST, "ARR_EV_NEW_SYN": maps.EV_NEW_SYN,
        "ARR_EV_AFTER_FIN": maps.EV_AFTER_FIN, "ARR_EV_CAPTURE": maps.EV_CAPTURE, "ARR_EV_RESEND": maps.EV_RESEND}
    assert define("ARR_CAPTURE_CHUNK") == str(maps.CAPTURE_CHUNK)
    assert define("ARR_CAPTURE_CHUNKS") == str(maps.CAPTURE_CHUNKS)
    flags = {name: eval(value.replace("U <<", " <<")) for name, value in
             re.findall(r"#define (FLOW_F_\w+) \((1U << \d+)\)", text)}
    assert flags == {name: getattr(maps, name) for name in flags} and "FLOW_F_ACKED" in flags
    stats = re.search(r"enum arr_stat \{(.*?)\};", text, re.S).group(1)
    names = [n.lower()[5:] for n in re.findall(r"^\s*(STAT_\w+)", stats, re.M) if n != "STAT_MAX"]
    assert tuple(names) == maps.STAT_NAMES


def test_every_header_is_part_of_the_build():
    """Each header is included by the umbrella arr_handoff.h, which both
    program sources include (so a change to any of them changes both)."""
    from handoff.build import SOURCE_DIR

    umbrella = (SOURCE_DIR / "arr_handoff.h").read_text()
    for header in SOURCE_DIR.glob("arr_*.h"):
        if header.name != "arr_handoff.h":
            assert f'#include "{header.name}"' in umbrella, header.name
    for program in ("router", "target"):
        assert '#include "arr_handoff.h"' in (SOURCE_DIR / f"{program}.bpf.c").read_text()
