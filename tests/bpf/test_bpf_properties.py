"""Property tests: the BPF programs equal handoff.packet, byte for byte.

Random translations and frames (scapy-built, option areas crafted byte by
byte) run through the loaded programs with BPF_PROG_TEST_RUN (fixtures in
conftest.py); the verdict and every output byte (MACs from the permanent
neighbours, checksums included) must be what the model predicts. Values are
biased to the 2**32 wrap: within 1000 of 0 and of 2**32.
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from handoff import packet
from handoff.maps import (FLOW_ACTIVE, FLOW_ENDED, FLOW_F_ACKED, FLOW_F_FIN, FLOW_F_NEW_SYN, FLOW_F_RST,
                          FLOW_F_SENT, FLOW_HOLD, WATCH_CLOSED, WATCH_CONNECTING, WATCH_HANDED_OFF, FlowEntry,
                          FlowKey, MirrorState, AckShiftState, WatchEntry, Xlate)
from handoff.packet import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
from handoff.translate import AckShift, Translation, seq_after

pytestmark = pytest.mark.bpf

MOD = 1 << 32
S = 10**9
PROPS = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(PROPS, max_examples=120)

# The two rewriting programs and the map their entry lives in.
REWRITERS = [("arr_router_ingress", "arr_ingress"), ("arr_target_egress", "arr_egress")]

# ------------------------------------------------------------------ strategies

near_wrap = st.one_of(st.integers(0, 1000), st.integers(MOD - 1000, MOD - 1))
u32 = st.one_of(near_wrap, near_wrap, st.integers(0, MOD - 1))
ports = st.integers(1, 65535)
any_address = st.ip_addresses(v=4).map(str)
# Destinations the namespace's FIB resolves (on-link permanent neighbours or
# via the gateway); see conftest.
routable = st.one_of(
    st.sampled_from(["10.9.0.2", "10.9.0.11", "10.9.0.12"]),
    st.tuples(st.one_of(st.integers(11, 126), st.integers(128, 223)), st.integers(0, 255),
              st.integers(0, 255), st.integers(0, 255)).map(lambda t: "%d.%d.%d.%d" % t))
windows = st.one_of(st.sampled_from([0, 1, 2, 0xFFFF]), st.integers(0, 0xFFFF))
shifts = st.integers(0, 14)


def translations(ack_delta=u32) -> st.SearchStrategy[Translation]:
    return st.builds(Translation, saddr=any_address, daddr=routable, sport=ports, dport=ports,
                     seq_delta=u32, ack_delta=ack_delta, tsval_delta=u32, tsecr_delta=u32,
                     wscale_in=shifts, wscale_out=shifts, tsecr_floor=st.one_of(st.just(0), u32))


def opt(kind: int, body: bytes) -> bytes:
    return bytes([kind, 2 + len(body)]) + body


# SACK blocks as (near the ack?, offset from the ack, or anywhere, block size):
# resolved against the packet's ack when the option area is assembled.
sack_blocks = st.lists(st.tuples(st.booleans(), st.integers(-3000, 3000), u32, st.integers(0, 3000)),
                       min_size=1, max_size=4)


def sack_option(ack: int, blocks: list[tuple[bool, int, int, int]]) -> bytes:
    """1 to 4 blocks, edges near the ack (so D-SACK, a first block below the
    ack, is common) or anywhere, across the wrap."""
    edges = []
    for near, offset, anywhere, size in blocks:
        left = (ack + offset) % MOD if near else anywhere
        edges += [left, (left + size) % MOD]
    return opt(packet.OPT_SACK, struct.pack(f"!{len(edges)}I", *edges))


option_items = st.one_of(
    st.just(b"\x01"),
    st.just(b"\x01\x01"),
    st.integers(0, 65535).map(lambda m: opt(packet.OPT_MSS, struct.pack("!H", m))),
    shifts.map(lambda w: opt(packet.OPT_WSCALE, bytes([w]))),
    st.just(opt(packet.OPT_SACK_PERM, b"")),
    st.tuples(u32, u32).map(lambda t: opt(packet.OPT_TS, struct.pack("!II", *t))),
    st.tuples(u32, u32).map(lambda t: opt(packet.OPT_TS, struct.pack("!II", *t))),
    sack_blocks,
    # Options the programs must leave alone: unknown kinds, a TS of the wrong size.
    st.tuples(st.sampled_from([6, 7, 19, 28, 30, 34, 253]), st.binary(max_size=6)).map(
        lambda t: opt(*t)),
    st.binary(min_size=4, max_size=4).map(lambda b: opt(packet.OPT_TS, b)),
)


@st.composite
def option_items_for(draw, ack: int, max_size: int) -> list[bytes]:
    return [item if isinstance(item, bytes) else sack_option(ack, item)
            for item in draw(st.lists(option_items, max_size=max_size))]


@st.composite
def option_area(draw, ack: int, eol_ok: bool = True) -> bytes:
    """A valid option area: items (NOPs anywhere, hence odd alignments), maybe
    an EOL followed by garbage (never looked at), padded with NOPs or zeros."""
    area = b""
    for item in draw(option_items_for(ack, 8)):
        if len(area) + len(item) <= 40:
            area += item
    if eol_ok and len(area) < 40 and draw(st.booleans()):
        area += b"\x00" + draw(st.binary(max_size=40 - len(area) - 1))
    pad = -len(area) % 4
    area += (b"\x01" if draw(st.booleans()) else b"\x00") * pad
    return area


ip_options = st.one_of(
    st.just([]),
    st.integers(1, 9).map(lambda n: [IPOption_NOP(), IPOption_RR(routers=["192.0.2.%d" % i
                                                                            for i in range(n)])]),
    st.just([IPOption_Router_Alert()]),
)


@st.composite
def frames(draw, key: tuple[str, str, int, int] | None = None, flags=None, options=None,
           payload=None, bad_checksums: bool = True, ack=None) -> bytes:
    """An Ethernet/IPv4/TCP frame; ``options`` a strategy of option areas
    given the ack (default: valid layouts)."""
    saddr, daddr, sport, dport = key or (draw(any_address), draw(any_address), draw(ports), draw(ports))
    ack = draw(ack if ack is not None else u32)
    area = draw((options if options is not None else option_area)(ack))
    size = draw(payload if payload is not None else st.one_of(st.just(0), st.integers(0, 1400)))
    start = draw(st.integers(0, 255))
    data = (bytes(range(256)) * 7)[start:start + size]
    tcp_flags = draw(flags if flags is not None else st.sampled_from(["A", "PA", "FA", "FPA", "R", "RA", "S", "SA", "UA"]))
    pkt = (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
           / IP(src=saddr, dst=daddr, id=draw(st.integers(0, 65535)),
                flags=draw(st.sampled_from([0, "DF"])), ttl=draw(st.integers(1, 255)),
                tos=draw(st.sampled_from([0, 0x10, 0xb8])), options=draw(ip_options))
           / TCP(sport=sport, dport=dport, seq=draw(u32), ack=ack, flags=tcp_flags,
                 window=draw(windows), urgptr=draw(st.sampled_from([0, 7])),
                 dataofs=5 + len(area) // 4)
           / Raw(area + data))
    frame = bytearray(bytes(pkt))
    if bad_checksums and draw(st.integers(0, 9)) == 0:  # a wrong input checksum is carried over
        l4 = 14 + (frame[14] & 15) * 4
        struct.pack_into("!H", frame, l4 + 16, draw(st.sampled_from([0, 0xFFFF, 0x1234])))
    if len(frame) < 60 and draw(st.booleans()):
        frame += b"\0" * (60 - len(frame))  # Ethernet minimum-size padding
    return bytes(frame)


NOT_SYN = st.sampled_from(["A", "PA", "FA", "FPA", "R", "RA", "UA"])
"""Flags of segments inside a connection (a SYN ends an entry: see below)."""


def key_of(frame: bytes) -> FlowKey:
    p = packet.parse(frame)
    assert p is not None
    return FlowKey.of((p.saddr, p.sport), (p.daddr, p.dport))


def active(x: Translation, state: int = FLOW_ACTIVE) -> FlowEntry:
    return FlowEntry(x=Xlate.of(x), state=state)


def expected_flags(frame: bytes, program: str = "") -> int:
    """FIN and RST as they pass; at the target, FLOW_F_SENT once the server
    sent anything but a RST (its snd_max is tracked for a take-back), and
    FLOW_F_ACKED once it sent an ACK (its highest ack, for a SHIFT)."""
    tcp_flags = packet.parse(frame).flags
    target = program == "arr_target_egress"
    sent = target and not tcp_flags & packet.TCPF_RST
    acked = target and tcp_flags & packet.TCPF_ACK
    return (FLOW_F_FIN if tcp_flags & packet.TCPF_FIN else 0) | (
        FLOW_F_RST if tcp_flags & packet.TCPF_RST else 0) | (FLOW_F_SENT if sent else 0) | (
        FLOW_F_ACKED if acked else 0)


def ack_of(frame: bytes) -> int:
    return struct.unpack_from("!I", frame, packet.parse(frame).l4 + 8)[0]


@st.composite
def shifts_near(draw, ack: int) -> AckShift:
    """An ack history whose shifted request lies around ACK: before it, after
    it, or with ACK inside, at either end or in the middle."""
    start = (ack + draw(st.integers(-3000, 3000))) % MOD
    return AckShift(start, (start + draw(st.integers(1, 3000))) % MOD, draw(st.integers(0, MOD - 1)))


def show(frame: bytes) -> str:
    return Ether(frame).show(dump=True)


# ------------------------------------------------------------ the rewrite

@pytest.mark.parametrize("program, table", REWRITERS)
@settings(PROPS, max_examples=250)
@given(data=st.data())
def test_rewrite_equals_the_model(bpf_env, program, table, data):
    frame = data.draw(frames(flags=NOT_SYN))
    x = data.draw(translations())
    key = key_of(frame)
    entry = active(x)
    shift = None
    if program == "arr_target_egress" and data.draw(st.booleans()):
        # A re-handoff in place moved the ack translation near this ack.
        shift = data.draw(shifts_near(ack_of(frame)))
        entry.shift = AckShiftState.of(shift)
    if program == "arr_router_ingress" and data.draw(st.booleans()):
        # An armed window mark within reach of the segment.
        seq = struct.unpack_from("!I", frame, packet.parse(frame).l4 + 4)[0]
        entry.seq_next = (seq + data.draw(st.integers(-packet.SEQ_WINDOW_MAX, packet.SEQ_WINDOW_MAX))) % MOD
    run = bpf_env.run(program, frame, {table: {key: entry}})
    verdict, out = packet.forward(frame, x, *bpf_env.next_hop(x.daddr), shift=shift)
    assert verdict == TC_ACT_REDIRECT
    assert (run.verdict, run.out) == (verdict, out), (show(run.out), show(out))
    after = run.maps[table][key]
    assert (after.packets, after.bytes, after.errors) == (1, len(frame), 0)
    assert after.flags == expected_flags(frame, program)
    if program == "arr_target_egress":
        server_acked = bool(packet.parse(frame).flags & packet.TCPF_ACK)
        assert after.peer_ack == (ack_of(frame) if server_acked else 0)
        # The history ends once the server acknowledged all of the shifted request.
        ended = shift is not None and server_acked and not seq_after(shift.end, ack_of(frame))
        assert after.shift.model() == (None if ended else shift)
    assert run.stats == {"rewritten": 1}
    if program == "arr_router_ingress":
        assert after.seq_next == packet.client_window(frame, entry.seq_next)[1]


@pytest.mark.parametrize("program, table", REWRITERS)
def test_every_shift_pair_on_a_window_update(bpf_env, program, table):
    base = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IP(src="10.9.0.2", dst="10.9.0.100") / TCP(sport=1, dport=2, flags="A"))
    frames_by_window = {}
    for window in (0, 1, 3, 0xFFFF):
        pkt = Ether(base)
        pkt[TCP].window = window
        del pkt[TCP].chksum
        frames_by_window[window] = bytes(pkt)
    for shift_in in range(15):
        for shift_out in range(15):
            x = Translation("10.9.0.1", "10.9.0.11", 50123, 8080, 5, 6, 7, 8, shift_in, shift_out)
            for frame in frames_by_window.values():
                run = bpf_env.run(program, frame, {table: {key_of(frame): active(x)}})
                assert (run.verdict, run.out) == packet.forward(frame, x, *bpf_env.next_hop(x.daddr))


# ---------------------------------------------------------- not ours: untouched

@st.composite
def other_frames(draw, key: tuple[str, str, int, int]) -> bytes:
    """Frames an entry keyed by ``key`` must not touch: another 4-tuple (one
    field changed, or the reverse direction), or the same flow but not a
    TCP header the programs parse (UDP, fragments)."""
    saddr, daddr, sport, dport = key
    how = draw(st.sampled_from(["saddr", "daddr", "sport", "dport", "reverse", "udp", "fragment"]))
    if how in ("saddr", "daddr"):
        other = draw(any_address.filter(lambda a: a != (saddr if how == "saddr" else daddr)))
        key = (other, daddr, sport, dport) if how == "saddr" else (saddr, other, sport, dport)
    elif how in ("sport", "dport"):
        other = draw(ports.filter(lambda p: p != (sport if how == "sport" else dport)))
        key = (saddr, daddr, other, dport) if how == "sport" else (saddr, daddr, sport, other)
    elif how == "reverse":
        key = (daddr, saddr, dport, sport)
        assume(key != (saddr, daddr, sport, dport))
    if how in ("udp", "fragment"):
        ip = IP(src=saddr, dst=daddr, flags="MF" if draw(st.booleans()) else 0,
                frag=0 if how == "udp" else draw(st.integers(0, 100)))
        if how == "fragment" and ip.flags == 0 and ip.frag == 0:
            ip.flags = "MF"
        l4 = UDP(sport=sport, dport=dport) if how == "udp" else TCP(sport=sport, dport=dport)
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4 / Raw(b"x" * 20))
    return draw(frames(key=key))


@pytest.mark.parametrize("program, table", REWRITERS)
@FEW
@given(data=st.data())
def test_other_flows_pass_untouched(bpf_env, program, table, data):
    x = data.draw(translations())
    key = (data.draw(any_address), data.draw(any_address), data.draw(ports), data.draw(ports))
    frame = data.draw(other_frames(key))
    entry_key = FlowKey.of((key[0], key[2]), (key[1], key[3]))
    run = bpf_env.run(program, frame, {table: {entry_key: active(x)}})
    assert (run.verdict, run.out) == (TC_ACT_OK, frame)
    assert run.maps[table][entry_key].packets == 0 and run.stats == {}


# ---------------------------------------------------------------- malformed

@st.composite
def malformed_area(draw, ack: int) -> bytes:
    """Valid options (no EOL), then one the walk must refuse."""
    prefix = b""
    for item in draw(option_items_for(ack, 5)):
        if len(prefix) + len(item) <= 36:  # whole options only, room left for the bad one
            prefix += item
    how = draw(st.sampled_from(["past", "past", "no length", "short", "sack"]))
    kind = draw(st.sampled_from([2, 3, 4, 5, 8, 30]))
    if how == "no length":
        size = len(prefix) + 1 + (-(len(prefix) + 1) % 4)
        return prefix + b"\x01" * (size - len(prefix) - 1) + bytes([kind])
    size = len(prefix) + 2 + (-(len(prefix) + 2) % 4)
    if size < 40 and draw(st.booleans()):
        size += 4
    room = size - len(prefix)
    if how == "past":
        bad = bytes([kind, draw(st.integers(room + 1, 255))])
    elif how == "short":
        bad = bytes([kind, draw(st.integers(0, 1))])
    else:  # a SACK whose length is not a whole number of blocks
        length = draw(st.integers(2, room).filter(lambda n: n not in packet.SACK_LENGTHS))
        bad = bytes([packet.OPT_SACK, length])
    return prefix + bad + draw(st.binary(min_size=room - 2, max_size=room - 2))




@pytest.mark.parametrize("program, table", REWRITERS)
@PROPS
@given(data=st.data())
def test_malformed_options_are_dropped_whole(bpf_env, program, table, data):
    x = data.draw(translations())
    if data.draw(st.integers(0, 4)) == 0:
        # The header claims options the frame does not have.
        whole = data.draw(frames(payload=st.just(0), flags=NOT_SYN))
        p = packet.parse(whole)
        assume(p.tcp_len > 20)
        frame = whole[: p.l4 + data.draw(st.integers(20, p.tcp_len - 1))]
    else:
        frame = data.draw(frames(options=malformed_area, flags=NOT_SYN))
    with pytest.raises(packet.Malformed):
        packet.translate(frame, x)
    key = key_of(frame)
    run = bpf_env.run(program, frame, {table: {key: active(x)}})
    assert (run.verdict, run.out) == (TC_ACT_SHOT, frame)  # nothing half-rewritten
    assert run.stats == {"rewrite_failed": 1}
    assert run.maps[table][key].errors == 1


@pytest.mark.parametrize("program, table", REWRITERS)
def test_bad_sack_length_is_dropped_even_when_ack_delta_is_zero(bpf_env, program, table):
    """A packet's fate must not depend on the translation leaving SACK as is."""
    area = b"\x01\x01" + opt(packet.OPT_SACK, b"\0\0\0\5")  # one edge, no block
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                  / IP(src="10.9.0.2", dst="10.9.0.100")
                  / TCP(sport=40000, dport=80, flags="A", dataofs=7) / Raw(area))
    x = Translation("10.9.0.1", "10.9.0.11", 50123, 8080, 99, 0, 1, 1, 0, 0)
    run = bpf_env.run(program, frame, {table: {key_of(frame): active(x)}})
    assert (run.verdict, run.out) == packet.forward(frame, x, *bpf_env.next_hop(x.daddr))


# ------------------------------------------------------------ entry states

@FEW
@given(data=st.data())
def test_router_holds_and_drops_after_close(bpf_env, data):
    frame = data.draw(frames(flags=NOT_SYN))
    key = key_of(frame)
    x = data.draw(translations())
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {key: active(x, FLOW_HOLD)}})
    assert (run.verdict, run.out, run.stats) == (TC_ACT_SHOT, frame, {"held": 1})
    assert run.maps["arr_ingress"][key].packets == 0
    run = bpf_env.run("arr_router_ingress", frame, {"arr_watch": {key: WatchEntry(state=WATCH_CLOSED)}})
    assert (run.verdict, run.out, run.stats) == (TC_ACT_SHOT, frame, {"dropped_after_close": 1})
    # The target has no hold: a non-active entry lets its packets through.
    run = bpf_env.run("arr_target_egress", frame, {"arr_egress": {key: active(x, FLOW_HOLD)}})
    assert (run.verdict, run.out, run.stats) == (TC_ACT_OK, frame, {})


# -------------------------------------------------------- SYN normalisation

@st.composite
def syn_area(draw, ack: int) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(malformed_area(ack))  # left alone: walked, refused, not written
    return draw(option_area(ack))


@PROPS
@given(data=st.data())
def test_syn_normalisation_equals_the_model(bpf_env, data):
    frame = data.draw(frames(flags=st.sampled_from(["S", "S", "SE", "SA", "A"]), options=syn_area,
                             payload=st.just(0)))
    mss = data.draw(st.one_of(st.just(0), st.integers(0, 65535)))
    sack_ok, ts_ok = data.draw(st.booleans()), data.draw(st.booleans())
    p = packet.parse(frame)
    watch_key = FlowKey.of((p.daddr, p.dport), (p.saddr, p.sport))  # keyed as the target sends
    state = data.draw(st.sampled_from([WATCH_CONNECTING, WATCH_HANDED_OFF, WATCH_CLOSED]))
    entry = WatchEntry(state=state, client_mss=mss, client_sack=sack_ok, client_ts=ts_ok)
    run = bpf_env.run("arr_router_egress", frame, {"arr_watch": {watch_key: entry}})
    # Only the SYN of the connection being set up: another SYN on a watched
    # 4-tuple is the router's own new connection, not to be touched.
    expected, changed = (packet.normalise_syn(frame, mss, sack_ok, ts_ok) if state == WATCH_CONNECTING
                         else (frame, False))
    assert (run.verdict, run.out) == (TC_ACT_OK, expected), (show(run.out), show(expected))
    assert run.maps["arr_watch"][watch_key].syn_rewrites == changed
    assert run.stats == ({"syn_normalised": 1} if changed else {})


# --------------------------------------------------------------- mirroring

@PROPS
@given(data=st.data())
def test_mirror_trimming_equals_the_model(bpf_env, data):
    frame = data.draw(frames(flags=st.sampled_from(["A", "PA", "FA", "FPA", "UA", "R", "RA"]),
                             payload=st.one_of(st.integers(1, 1400), st.just(0))))
    rcv_nxt = data.draw(u32)
    # The router's snd_nxt: unknown (0), or near the clone's ack either side.
    ack = struct.unpack_from("!I", frame, packet.parse(frame).l4 + 8)[0]
    request_end = data.draw(st.one_of(st.just(0), u32, st.integers(-3, 3).map(lambda d: (ack + d) % 2**32)))
    key = key_of(frame)
    run = bpf_env.run("arr_router_ingress", frame,
                      {"arr_watch": {key: WatchEntry(state=WATCH_HANDED_OFF, rcv_nxt=rcv_nxt,
                                                     request_end=request_end)}})
    expected = packet.trim_mirror(frame, rcv_nxt, request_end)
    assert (run.verdict, run.out) == (TC_ACT_OK, expected), (show(run.out), show(expected))
    trimmed = not packet.parse(frame).flags & packet.TCPF_RST
    assert run.maps["arr_watch"][key].mirrored == trimmed
    assert run.stats == ({"mirror_trimmed": 1} if trimmed else {})


@settings(FEW, max_examples=100)
@given(data=st.data())
def test_mirroring_clones_once_per_advancing_ack(bpf_env, data):
    """A sequence of target packets with acks around the request's end: each is
    cloned iff the model says so (at most once per advance of the ack, plus
    every pure ACK), and rewritten like any other."""
    fwd = ("10.9.0.11", "10.9.0.1", 8080, 50123)
    x = data.draw(translations())
    start = data.draw(u32)
    until = (start + data.draw(st.integers(1, 5000))) % MOD
    mirror = MirrorState(mirror_until=until, mirrored_ack=start)
    key = FlowKey.of((fwd[0], fwd[2]), (fwd[1], fwd[3]))
    bpf_env.sent()  # drop what earlier tests left on x1
    for _ in range(data.draw(st.integers(1, 6))):
        ack = st.integers(-100, 5100).map(lambda d: (start + d) % MOD)
        frame = data.draw(frames(key=fwd, flags=st.sampled_from(["A", "PA", "FA"]),
                                 payload=st.one_of(st.just(0), st.integers(1, 300)), ack=ack))
        clone, new_ack = packet.mirror_decision(frame, mirror.mirror_until, mirror.mirrored_ack)
        if clone and packet.parse(frame).payload_len:
            assert new_ack != mirror.mirrored_ack  # data is cloned only when the ack advances
        run = bpf_env.run("arr_target_egress", frame,
                          {"arr_egress": {key: active(x)}, "arr_mirror": {key: mirror}})
        assert (run.verdict, run.out) == packet.forward(frame, x, *bpf_env.next_hop(x.daddr))
        assert run.stats.get("mirrored", 0) == clone
        # The clone is the packet as the target sent it, not rewritten.
        assert bpf_env.sent(wait=1.0 if clone else 0.0) == ([frame] if clone else [])
        mirror = run.maps["arr_mirror"][key]
        assert (mirror.mirror_until, mirror.mirrored_ack) == (until, new_ack)


@settings(FEW, max_examples=60)
@given(data=st.data())
def test_the_mirror_ends_itself_after_a_bounded_tail(bpf_env, data):
    """The mirror as a whole (packet.mirror_step): once an ack reaches the
    request's end, only pure ACKs are cloned, at most MIRROR_TAIL_ACKS within
    MIRROR_TAIL_NS; the first pure ACK past either bound deletes the state,
    and from then on nothing is cloned (no STOP_MIRROR needed)."""
    fwd = ("10.9.0.11", "10.9.0.1", 8080, 50123)
    key = FlowKey.of((fwd[0], fwd[2]), (fwd[1], fwd[3]))
    x = data.draw(translations())
    start = data.draw(u32)
    until = (start + data.draw(st.integers(1, 5000))) % MOD
    phase = data.draw(st.sampled_from(["request", "tail", "tail-full", "tail-old"]))
    now = time.monotonic_ns()
    if phase == "request":
        model = packet.Mirror(until, start)
    else:
        tail = packet.MIRROR_TAIL_ACKS if phase == "tail-full" else data.draw(
            st.integers(0, packet.MIRROR_TAIL_ACKS - 1))
        age = 5 * S if phase == "tail-old" else S // 2
        model = packet.Mirror(until, until, tail, (now - age) | 1)
    bpf_env.sent()
    for _ in range(data.draw(st.integers(1, 12))):
        ack = st.integers(-100, 5100).map(lambda d: (start + d) % MOD)
        frame = data.draw(frames(key=fwd, flags=st.sampled_from(["A", "A", "PA", "FA"]),
                                 payload=st.one_of(st.just(0), st.integers(1, 300)), ack=ack))
        state = {"arr_egress": {key: active(x)}}
        if model is not None:
            state["arr_mirror"] = {key: MirrorState(model.mirror_until, model.mirrored_ack, model.tail_acks, 0,
                                                    model.acked_ns)}
        run = bpf_env.run("arr_target_egress", frame, state)
        if model is None:
            clone, after = False, None
        else:
            clone, after = packet.mirror_step(frame, model, time.monotonic_ns())
        assert (run.verdict, run.out) == packet.forward(frame, x, *bpf_env.next_hop(x.daddr))
        assert run.stats.get("mirrored", 0) == clone
        assert run.stats.get("mirror_done", 0) == (model is not None and after is None)
        assert bpf_env.sent(wait=1.0 if clone else 0.0) == ([frame] if clone else [])
        got = run.maps["arr_mirror"].get(key)
        if after is None:
            assert got is None
        else:
            assert (got.mirror_until, got.mirrored_ack, got.tail_acks) == (
                after.mirror_until, after.mirrored_ack, after.tail_acks)
            # the program's clock, not the test's: only whether it is set
            assert (got.acked_ns != 0) == (after.acked_ns != 0)
            if model.acked_ns:
                assert got.acked_ns == model.acked_ns
            after = packet.Mirror(after.mirror_until, after.mirrored_ack, after.tail_acks, got.acked_ns)
        model = after


# ------------------------------------------------- an entry is one connection

@pytest.mark.parametrize("program, table", REWRITERS)
@FEW
@given(data=st.data())
def test_a_syn_ends_the_entry_and_passes_untouched(bpf_env, program, table, data):
    """A SYN (client's at the router, SYN-ACK at the target) on an active
    entry's 4-tuple is a new connection: the entry becomes ENDED, the SYN goes
    to the local stack unchanged, and later packets pass untranslated. A late
    copy of the connection's own SYN is dropped and ends nothing."""
    frame = data.draw(frames(flags=st.sampled_from(["S", "SA", "SE"])))
    key = key_of(frame)
    seq = struct.unpack_from("!I", frame, packet.parse(frame).l4 + 4)[0]
    entry = active(data.draw(translations()))
    entry.syn_seq = seq if data.draw(st.booleans()) else data.draw(u32)
    state = {table: {key: entry}}
    if program == "arr_target_egress":
        state["arr_mirror"] = {key: MirrorState(1, 1)}
    run = bpf_env.run(program, frame, state)
    verdict = packet.syn_verdict(frame, entry.syn_seq)
    assert (run.verdict, run.out) == (verdict, frame)
    after = run.maps[table][key]
    if verdict == TC_ACT_SHOT:
        assert (after.state, after.flags, run.stats) == (FLOW_ACTIVE, 0, {"stale_syn": 1})
        return
    assert (after.state, after.flags, after.packets) == (FLOW_ENDED, FLOW_F_NEW_SYN, 0)
    assert run.stats == {"ended_by_syn": 1}
    if program == "arr_target_egress":
        assert run.maps["arr_mirror"] == {}
    # The new connection's packets: through, untranslated, counted.
    follow = data.draw(frames(key=(packet.parse(frame).saddr, packet.parse(frame).daddr,
                                   packet.parse(frame).sport, packet.parse(frame).dport)))
    run = bpf_env.run(program, follow, {table: {key: after}})
    assert (run.verdict, run.out, run.stats) == (TC_ACT_OK, follow, {"passed_ended": 1})


@FEW
@given(data=st.data())
def test_router_drops_client_segments_outside_any_window(bpf_env, data):
    """A segment further from the connection's mark than any window cannot be
    the connection's: dropped, neither forwarded nor counted, the mark stays."""
    frame = data.draw(frames(flags=NOT_SYN))
    key = key_of(frame)
    seq = struct.unpack_from("!I", frame, packet.parse(frame).l4 + 4)[0]
    distance = data.draw(st.integers(packet.SEQ_WINDOW_MAX + 1, MOD - packet.SEQ_WINDOW_MAX - 1))
    entry = active(data.draw(translations()))
    entry.seq_next = ((seq - distance) % MOD) or 1
    assume(not packet.client_window(frame, entry.seq_next)[0])
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {key: entry}})
    assert (run.verdict, run.out, run.stats) == (TC_ACT_SHOT, frame, {"out_of_window": 1})
    after = run.maps["arr_ingress"][key]
    assert (after.packets, after.last_seen_ns, after.seq_next) == (0, 0, entry.seq_next)


def test_router_lets_a_new_connections_synack_through_a_closed_watch(bpf_env):
    """After the silent close the target's late packets are dropped, but a
    SYN-ACK answers a SYN of the router's own stack: a new connection."""
    fwd = ("10.9.0.11", "10.9.0.1", 8080, 50123)
    key = FlowKey.of((fwd[0], fwd[2]), (fwd[1], fwd[3]))
    closed = {"arr_watch": {key: WatchEntry(state=WATCH_CLOSED)}}
    synack = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=fwd[0], dst=fwd[1])
                   / TCP(sport=fwd[2], dport=fwd[3], flags="SA", seq=7, ack=9))
    ack = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=fwd[0], dst=fwd[1])
                / TCP(sport=fwd[2], dport=fwd[3], flags="A", seq=8, ack=9))
    assert bpf_env.run("arr_router_ingress", synack, closed).verdict == TC_ACT_OK
    run = bpf_env.run("arr_router_ingress", ack, closed)
    assert (run.verdict, run.stats) == (TC_ACT_SHOT, {"dropped_after_close": 1})
