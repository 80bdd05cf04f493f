"""handoff.packet (the byte-level model of the BPF rewrites) against scapy.

Scapy builds the packets and, for the expected output, recomputes every
checksum from scratch: equality shows that the model's incremental updates are
exactly a full recomputation whenever the input checksums were right.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, given, settings, strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from handoff import packet
from handoff.translate import TcpFields, Translation, translate_fields

MOD = 1 << 32
SRC_MAC, DST_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def eth() -> Ether:
    return Ether(src=SRC_MAC, dst=DST_MAC)  # never a bare Ether(): scapy would ARP


u32 = st.one_of(st.integers(0, 1000), st.integers(MOD - 1000, MOD - 1), st.integers(0, MOD - 1))
ports = st.integers(1, 65535)
addresses = st.ip_addresses(v=4).map(str)

translations = st.builds(Translation, saddr=addresses, daddr=addresses, sport=ports, dport=ports,
                         seq_delta=u32, ack_delta=u32, tsval_delta=u32, tsecr_delta=u32,
                         wscale_in=st.integers(0, 14), wscale_out=st.integers(0, 14), tsecr_floor=u32)

option = st.one_of(
    st.just(("NOP", None)),
    st.integers(536, 65535).map(lambda m: ("MSS", m)),
    st.integers(0, 14).map(lambda w: ("WScale", w)),
    st.just(("SAckOK", b"")),
    st.tuples(u32, u32).map(lambda t: ("Timestamp", t)),
    st.lists(u32, min_size=2, max_size=8).filter(lambda e: len(e) % 2 == 0)
    .map(lambda e: ("SAck", tuple(e))),
)


def fits(options: list) -> bool:
    size = {"NOP": 1, "MSS": 4, "WScale": 3, "SAckOK": 2, "Timestamp": 10}
    return sum(size.get(k, 2 + 4 * len(v) if k == "SAck" else 0) for k, v in options) <= 40


option_lists = st.lists(option, max_size=8).filter(fits)
ip_options = st.sampled_from([[], [IPOption_NOP(), IPOption_RR(routers=["1.2.3.4"])],
                              [IPOption_RR(routers=["5.6.7.8"] * 4)]])


@st.composite
def frames(draw, flags=st.sampled_from(["A", "PA", "FA", "R", "RA", "S", "SA"])) -> Ether:
    return eth() / IP(src=draw(addresses), dst=draw(addresses), id=draw(st.integers(0, 65535)),
                      flags=draw(st.sampled_from([0, "DF"])), options=draw(ip_options)) / TCP(
        sport=draw(ports), dport=draw(ports), seq=draw(u32), ack=draw(u32), flags=draw(flags),
        window=draw(st.integers(0, 65535)), options=draw(option_lists)) / Raw(
        draw(st.binary(max_size=64)))


def scapy_translate(pkt: Ether, x: Translation) -> bytes:
    """The same rewrite done field by field in scapy, checksums recomputed."""
    new = pkt.copy()
    ip, tcp = new[IP], new[TCP]
    out = translate_fields(TcpFields(ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq, tcp.ack,
                                     tcp.window), x)
    ip.src, ip.dst, tcp.sport, tcp.dport = out.saddr, out.daddr, out.sport, out.dport
    tcp.seq, tcp.ack, tcp.window = out.seq, out.ack, out.window
    options = []
    for kind, value in tcp.options:
        if kind == "Timestamp":
            genuine = not x.tsecr_floor or (value[1] != 0 and (value[1] - x.tsecr_floor) % MOD < 1 << 31)
            value = ((value[0] + x.tsval_delta) % MOD, (value[1] - x.tsecr_delta) % MOD if genuine else 0)
        elif kind == "SAck":
            value = tuple((edge - x.ack_delta) % MOD for edge in value)
        options.append((kind, value))
    tcp.options = options
    del ip.chksum, tcp.chksum
    return bytes(new)


@settings(database=None, max_examples=300, deadline=None)
@given(frames(), translations)
def test_translate_equals_scapy_with_checksums_recomputed(pkt, x):
    frame = bytes(pkt)
    assert packet.translate(frame, x) == scapy_translate(Ether(frame), x)


@settings(database=None, max_examples=200, deadline=None)
@given(frames())
def test_parse_finds_the_headers(pkt):
    frame = bytes(pkt)
    p = packet.parse(frame)
    assert p is not None
    ip, tcp = pkt[IP], Ether(frame)[TCP]
    assert p.key == (ip.src, ip.dst, tcp.sport, tcp.dport)
    assert p.l4 == 14 + Ether(frame)[IP].ihl * 4
    assert (p.tcp_len, p.flags) == (Ether(frame)[TCP].dataofs * 4, int(Ether(frame)[TCP].flags))
    assert p.payload_len == len(pkt[Raw].load)


def test_parse_rejects_what_the_programs_skip():
    tcp = TCP(sport=1, dport=2)
    assert packet.parse(bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2") / UDP())) is None
    assert packet.parse(bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2", flags="MF") / tcp)) is None
    assert packet.parse(bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2", frag=3) / tcp)) is None
    assert packet.parse(bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2", flags="DF") / tcp)) is not None
    assert packet.parse(bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(dataofs=4))) is None
    assert packet.parse(bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2"))[:40]) is None


@settings(database=None, max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=80).filter(lambda b: len(b) % 2 == 0),
       st.data())
def test_incremental_update_is_a_full_recomputation(old, data):
    old = b"\x45\x06" + old  # headers always hold a non-zero word
    at = data.draw(st.integers(0, len(old) // 2 - 1)) * 2
    repl = data.draw(st.binary(min_size=0, max_size=len(old) - at).filter(lambda b: len(b) % 2 == 0))
    new = old[:at] + repl + old[at + len(repl):]
    assert packet.csum_update(packet.checksum(old), old[at:at + len(repl)], repl) == packet.checksum(new)
    # A wrong checksum stays exactly as wrong (the error is carried over).
    bad = data.draw(st.integers(0, 0xFFFF))
    updated = packet.csum_update(bad, old[at:at + len(repl)], repl)
    assert (packet.ones_sum(new) + updated - packet.ones_sum(old) - bad) % 0xFFFF == 0
    assert 0 <= updated <= 0xFFFE


def test_checksum_ffff_is_normalised_by_any_update():
    # 0xFFFF and 0 are the same one's-complement value; the kernel's update never yields 0xFFFF.
    assert packet.csum_update(0xFFFF, b"\0\1", b"\0\1") == 0


@pytest.mark.parametrize("opts", [
    b"\x08\x0a" + b"\0" * 7,          # TS running past the end
    b"\x01\x01\x01\x02",               # MSS kind in the last byte, no length
    b"\x02\x01\x00\x00",               # length below 2
    b"\x13\x00\x01\x01",               # length 0
    b"\x01\x05\x0c" + b"\0" * 9,       # SACK of 12 bytes is not a whole block (checked in translate)
])
def test_malformed_options_are_refused(opts):
    pkt = eth() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(dataofs=5 + len(opts) // 4) / Raw(opts)
    x = Translation("3.3.3.3", "4.4.4.4", 5, 6, 1, 1, 1, 1, 0, 0)
    with pytest.raises(packet.Malformed):
        packet.translate(bytes(pkt), x)
    assert packet.forward(bytes(pkt), x, b"\1" * 6, b"\2" * 6) == (packet.TC_ACT_SHOT, bytes(pkt))


def test_options_after_eol_are_not_looked_at():
    assert packet.walk_options(b"\x01\x00\x08\x0a") == []
    assert packet.walk_options(b"\x02\x04\x05\xb4\x00\xff") == [packet.Option(0, 2, 4)]


def test_forward_sets_next_hop_macs():
    pkt = eth() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP()
    x = Translation("3.3.3.3", "4.4.4.4", 5, 6, 1, 1, 1, 1, 0, 0)
    verdict, out = packet.forward(bytes(pkt), x, b"\xaa" * 6, b"\xbb" * 6)
    assert verdict == packet.TC_ACT_REDIRECT
    assert out[:12] == b"\xaa" * 6 + b"\xbb" * 6 and out[12:] == packet.translate(bytes(pkt), x)[12:]


@settings(database=None, max_examples=200, deadline=None)
@given(frames(flags=st.just("S")), st.integers(0, 65535), st.booleans(), st.booleans())
def test_normalise_syn_equals_scapy(pkt, mss, sack_ok, ts_ok):
    frame = bytes(pkt)
    got, changed = packet.normalise_syn(frame, mss, sack_ok, ts_ok)
    new = Ether(frame)
    options, expect_change = [], False
    for kind, value in new[TCP].options:
        if kind == "MSS" and mss:
            options.append(("MSS", mss))
            expect_change = True
        elif kind == "SAckOK" and not sack_ok:
            options += [("NOP", None)] * 2
            expect_change = True
        elif kind == "Timestamp" and not ts_ok:
            options += [("NOP", None)] * 10
            expect_change = True
        else:
            options.append((kind, value))
    new[TCP].options = options
    del new[TCP].chksum
    assert changed == expect_change
    assert got == (bytes(new) if changed else frame)


@settings(database=None, max_examples=100, deadline=None)
@given(frames(flags=st.sampled_from(["A", "SA", "FA"])), st.integers(0, 65535), st.booleans(),
       st.booleans())
def test_normalise_syn_leaves_everything_but_syns(pkt, mss, sack_ok, ts_ok):
    frame = bytes(pkt)
    assert packet.normalise_syn(frame, mss, sack_ok, ts_ok) == (frame, False)


@settings(database=None, max_examples=200, deadline=None)
@given(frames(flags=st.sampled_from(["A", "PA", "FA", "FPA", "SA"])), u32, st.integers(0, 20))
def test_trim_mirror_equals_scapy(pkt, rcv_nxt, padding):
    frame = bytes(pkt) + b"\0" * padding  # Ethernet padding goes too
    new = Ether(bytes(pkt))
    new[TCP].remove_payload()
    new[TCP].seq = rcv_nxt
    new[TCP].flags = int(new[TCP].flags) & ~0x09
    del new[IP].len, new[IP].chksum, new[TCP].chksum
    assert packet.trim_mirror(frame, rcv_nxt) == bytes(new)


@settings(database=None, max_examples=200, deadline=None)
@given(frames(flags=st.sampled_from(["A", "PA", "FA"])), u32, st.integers(-3, 3))
def test_trim_mirror_acks_no_further_than_the_routers_request(pkt, rcv_nxt, beyond):
    """An ack past the router's request (the client's FIN or next bytes,
    translated) is lowered to the request's end; one short of it, or at it,
    stays; across the sequence wrap too."""
    ack = pkt[TCP].ack
    request_end = (ack - beyond) % 2**32
    assume(request_end != 0)  # 0 means "not known"
    new = Ether(packet.trim_mirror(bytes(pkt), rcv_nxt, request_end))
    assert new[TCP].ack == (request_end if beyond > 0 else ack)
    assert new[TCP].seq == rcv_nxt
    assert packet.trim_mirror(bytes(pkt), rcv_nxt, 0) == packet.trim_mirror(bytes(pkt), rcv_nxt)


def test_trim_mirror_leaves_rsts():
    frame = bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(flags="RA") / Raw(b"x"))
    assert packet.trim_mirror(frame, 5) == frame


@pytest.mark.parametrize("ack, payload, until, mirrored, expected", [
    (2000, 100, 2000, 1000, (True, 2000)),      # advances: cloned
    (2000, 100, 2000, 2000, (False, 2000)),     # nothing new, data: not cloned
    (2000, 0, 2000, 2000, (True, 2000)),        # pure ACK: always cloned
    (5, 100, 10, MOD - 10, (True, 5)),          # advances across the wrap
    (3000, 100, 2000, 2500, (False, 2500)),     # request all acknowledged already
    (900, 100, 2000, 1000, (False, 1000)),      # an old ack
])
def test_mirror_decision(ack, payload, until, mirrored, expected):
    frame = bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(ack=ack, flags="A") / Raw(b"x" * payload))
    assert packet.mirror_decision(frame, until, mirrored) == expected


def test_payload_len_ignores_ethernet_padding():
    frame = bytes(eth() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP()) + b"\0" * 6
    assert packet.parse(frame).payload_len == 0
    assert struct.unpack_from("!H", frame, 16)[0] == 40
