"""The segments the router crafts to move a handed-off connection
(handoff/craft.py): well-formed IPv4/TCP, both checksums right, sequence
numbers modulo 2**32. Checked against handoff/packet.py's parser and an
RFC 1071 checksum written here from scratch."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, strategies as st

from handoff import packet
from handoff.craft import TCP_ACK, TCP_RST, ack, probe, reset, tcp_segment

MOD = 1 << 32
ETHERNET = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"

SERVICE, CLIENT = ("192.0.2.1", 80), ("198.51.100.7", 51234)


def rfc1071(data: bytes) -> int:
    """~(the one's-complement sum of 16-bit words), carries folded."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header(pkt: bytes) -> bytes:
    return pkt[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(pkt) - 20)


def fields(pkt: bytes) -> dict:
    (sport, dport, seq, ack, offset, flags, window, check, urgent) = struct.unpack_from("!HHIIBBHHH", pkt, 20)
    return {"sport": sport, "dport": dport, "seq": seq, "ack": ack, "offset": offset, "flags": flags,
            "window": window, "check": check, "urgent": urgent}


def assert_well_formed(pkt: bytes, src: tuple[str, int], dst: tuple[str, int]) -> packet.TcpFrame:
    assert len(pkt) == 40
    parsed = packet.parse(ETHERNET + pkt)
    assert parsed is not None
    assert (parsed.saddr, parsed.sport, parsed.daddr, parsed.dport) == (*src, *dst)
    assert (parsed.l4, parsed.tcp_len, parsed.ip_total, parsed.payload_len) == (34, 20, 40, 0)
    version_ihl, tos, total, ident, frag, ttl, proto, ip_check = struct.unpack_from("!BBHHHBBH", pkt)
    assert (version_ihl, total, proto, ttl) == (0x45, 40, 6, 64)
    assert frag == 0x4000  # DF, no fragment offset
    # The IP checksum: the header sums to 0xFFFF with it, and a recomputation
    # with the field zeroed gives the field.
    assert rfc1071(pkt[:20]) == 0
    assert rfc1071(pkt[:10] + b"\0\0" + pkt[12:20]) == ip_check
    # The TCP checksum, over the pseudo-header: the same two ways.
    tcp = pkt[20:]
    assert rfc1071(pseudo_header(pkt) + tcp) == 0
    assert rfc1071(pseudo_header(pkt) + tcp[:16] + b"\0\0" + tcp[18:]) == fields(pkt)["check"]
    assert packet.checksum(pseudo_header(pkt) + tcp[:16] + b"\0\0" + tcp[18:]) == fields(pkt)["check"]
    f = fields(pkt)
    assert f["offset"] == 5 << 4 and f["urgent"] == 0
    return parsed


def test_a_segment_has_the_fields_asked_for():
    pkt = tcp_segment(SERVICE, CLIENT, seq=1000, ack=2000, flags=TCP_ACK, window=512)
    parsed = assert_well_formed(pkt, SERVICE, CLIENT)
    assert parsed.flags == TCP_ACK
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["window"]) == (1000, 2000, 512)
    assert pkt[12:16] == socket.inet_aton("192.0.2.1") and pkt[16:20] == socket.inet_aton("198.51.100.7")


def test_a_known_segment_byte_for_byte():
    # Checksums by hand: IP 0x4500 + 0x0028 + 0x4000 + 0x4006 + 0x0a00 + 0x0001 + 0x0a00 + 0x0002
    # = 0xd931 -> 0x26ce; TCP pseudo-header 0x141d + header 0x501a = 0x6437 -> 0x9bc8.
    pkt = tcp_segment(("10.0.0.1", 1), ("10.0.0.2", 2), seq=3, ack=4, flags=TCP_ACK)
    assert pkt == bytes.fromhex("45000028" "00004000" "400626ce" "0a000001" "0a000002"
                                "00010002" "00000003" "00000004" "50100000" "9bc80000")


def test_a_corrupted_segment_fails_the_checks():
    """The checks above can fail: any one flipped bit breaks a checksum."""
    pkt = tcp_segment(SERVICE, CLIENT, seq=1, ack=2, flags=TCP_ACK)
    for bit in (0x01, 0x80):
        bad_ip = bytearray(pkt)
        bad_ip[8] ^= bit  # the TTL
        assert rfc1071(bytes(bad_ip[:20])) != 0
        bad_tcp = bytearray(pkt)
        bad_tcp[27] ^= bit  # in seq
        assert rfc1071(pseudo_header(bytes(bad_tcp)) + bytes(bad_tcp[20:])) != 0
    with pytest.raises(AssertionError):
        assert_well_formed(pkt[:39] + bytes([pkt[39] ^ 1]), SERVICE, CLIENT)


def test_the_probe_is_an_old_ack_from_the_service():
    pkt = probe(SERVICE, CLIENT, client_acked=5000, client_next=7000)
    parsed = assert_well_formed(pkt, SERVICE, CLIENT)
    assert parsed.flags == TCP_ACK
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["window"]) == (4999, 7000, 0)


def test_the_reset_is_a_bare_rst_at_seq():
    pkt = reset(("10.0.0.1", 40001), ("10.0.0.11", 8080), seq=123456789)
    parsed = assert_well_formed(pkt, ("10.0.0.1", 40001), ("10.0.0.11", 8080))
    assert parsed.flags == TCP_RST
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["window"]) == (123456789, 0, 0)


def test_the_probe_below_zero_wraps():
    f = fields(probe(SERVICE, CLIENT, client_acked=0, client_next=MOD))
    assert (f["seq"], f["ack"]) == (MOD - 1, 0)


ADDRESSES = st.tuples(st.integers(1, 0xFFFFFFFE).map(lambda n: socket.inet_ntoa(n.to_bytes(4, "big"))),
                      st.integers(0, 65535))
WIDE = st.integers(-(1 << 40), 1 << 40)


@given(src=ADDRESSES, dst=ADDRESSES, seq=WIDE, ack=WIDE,
       flags=st.integers(0, 0xFF), window=st.integers(0, 0xFFFF))
def test_any_segment_is_well_formed_with_fields_modulo_2_32(src, dst, seq, ack, flags, window):
    pkt = tcp_segment(src, dst, seq=seq, ack=ack, flags=flags, window=window)
    parsed = assert_well_formed(pkt, src, dst)
    assert parsed.flags == flags
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["window"]) == (seq % MOD, ack % MOD, window)


@given(service=ADDRESSES, client=ADDRESSES, acked=WIDE, nxt=WIDE)
def test_the_probe_seq_is_one_below_client_acked_modulo_2_32(service, client, acked, nxt):
    pkt = probe(service, client, client_acked=acked, client_next=nxt)
    assert_well_formed(pkt, service, client)
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["flags"]) == ((acked - 1) % MOD, nxt % MOD, TCP_ACK)
    assert (f["seq"] + 1) % MOD == acked % MOD


@given(source=ADDRESSES, destination=ADDRESSES, seq=WIDE)
def test_any_reset_is_well_formed(source, destination, seq):
    pkt = reset(source, destination, seq)
    assert_well_formed(pkt, source, destination)
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["flags"], f["window"]) == (seq % MOD, 0, TCP_RST, 0)


def options_of(pkt: bytes) -> bytes:
    return pkt[40:20 + (pkt[32] >> 4) * 4]


def test_the_ack_of_a_rebuilt_socket_carries_its_timestamps_as_linux_lays_them_out():
    pkt = ack(SERVICE, CLIENT, seq=1000, ack=2000, window=300, tsval=0xDEADBEEF, tsecr=7)
    assert len(pkt) == 52
    parsed = packet.parse(ETHERNET + pkt)
    assert parsed is not None and parsed.flags == TCP_ACK
    assert (parsed.tcp_len, parsed.payload_len) == (32, 0)
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["window"], f["offset"]) == (1000, 2000, 300, 8 << 4)
    assert options_of(pkt) == bytes.fromhex("0101080a" "deadbeef" "00000007")  # NOP NOP TS
    assert rfc1071(pkt[:20]) == 0 and rfc1071(pseudo_header(pkt) + pkt[20:]) == 0


def test_the_ack_without_timestamps_is_a_bare_ack():
    pkt = ack(SERVICE, CLIENT, seq=1, ack=2, window=3)
    assert assert_well_formed(pkt, SERVICE, CLIENT).flags == TCP_ACK
    assert (fields(pkt)["seq"], fields(pkt)["ack"], fields(pkt)["window"]) == (1, 2, 3)


@given(source=ADDRESSES, destination=ADDRESSES, seq=WIDE, acked=WIDE, window=st.integers(0, 0xFFFF),
       tsval=WIDE, tsecr=WIDE)
def test_any_ack_is_well_formed_with_fields_modulo_2_32(source, destination, seq, acked, window, tsval, tsecr):
    pkt = ack(source, destination, seq=seq, ack=acked, window=window, tsval=tsval, tsecr=tsecr)
    assert rfc1071(pkt[:20]) == 0 and rfc1071(pseudo_header(pkt) + pkt[20:]) == 0
    f = fields(pkt)
    assert (f["seq"], f["ack"], f["window"], f["flags"]) == (seq % MOD, acked % MOD, window, TCP_ACK)
    assert struct.unpack("!BBBBII", options_of(pkt)) == (1, 1, 8, 10, tsval % MOD, tsecr % MOD)
