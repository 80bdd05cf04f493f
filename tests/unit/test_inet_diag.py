"""arr.inet_diag without a kernel: request bytes, reply parsing, the port filter.

Expected bytes are spelled out field by field from the uapi layouts
(netlink.h, inet_diag.h) with the helpers below, not with the module's own
structs: netlink headers and plain integers in host order, ports and
addresses in network order.
"""

from __future__ import annotations

import errno
import socket
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arr import inet_diag as d
from arr.inet_diag import TcpSocket, TcpState


def u8(n: int) -> bytes:
    return n.to_bytes(1, sys.byteorder)


def u16(n: int) -> bytes:
    return n.to_bytes(2, sys.byteorder)


def u32(n: int) -> bytes:
    return n.to_bytes(4, sys.byteorder)


def i32(n: int) -> bytes:
    return n.to_bytes(4, sys.byteorder, signed=True)


def be16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ip(host: str) -> bytes:
    """One __be32[4] address field holding an IPv4 address."""
    return bytes(int(part) for part in host.split(".")) + bytes(12)


def nlmsghdr(length: int, msg_type: int, flags: int, seq: int = 1, pid: int = 0) -> bytes:
    return u32(length) + u16(msg_type) + u16(flags) + u32(seq) + u32(pid)


def sockid(local: tuple[str, int], remote: tuple[str, int], ifindex: int = 0,
           cookie: tuple[int, int] = (0, 0)) -> bytes:
    """struct inet_diag_sockid; COOKIE as its two words (low, high)."""
    return (be16(local[1]) + be16(remote[1]) + ip(local[0]) + ip(remote[0])
            + u32(ifindex) + u32(cookie[0]) + u32(cookie[1]))


NOCOOKIE = (0xFFFFFFFF, 0xFFFFFFFF)
TCP_REQUEST_HEAD = u8(socket.AF_INET) + u8(socket.IPPROTO_TCP) + u8(0) + u8(0)  # family, protocol, ext, pad
ALL = 0x1FFE  # bits 1..12


def diag_msg(local, remote, state: int, cookie: int = 0, rqueue: int = 0, wqueue: int = 0, uid: int = 0,
             inode: int = 0, attributes: bytes = b"", seq: int = 1) -> bytes:
    """A reply message as the kernel sends it: nlmsghdr + inet_diag_msg (+ attributes)."""
    body = (u8(socket.AF_INET) + u8(state) + u8(0) + u8(0)
            + sockid(local, remote, cookie=(cookie & 0xFFFFFFFF, cookie >> 32))
            + u32(0) + u32(rqueue) + u32(wqueue) + u32(uid) + u32(inode) + attributes)
    return nlmsghdr(16 + len(body), d.SOCK_DIAG_BY_FAMILY, d.NLM_F_MULTI, seq) + body


def done(error: int = 0) -> bytes:
    return nlmsghdr(20, d.NLMSG_DONE, d.NLM_F_MULTI) + i32(error)


def error(err: int, request: bytes = b"") -> bytes:
    """NLMSG_ERROR: the (negative) error, then the request's header."""
    echoed = request[:16] or nlmsghdr(16, d.SOCK_DIAG_BY_FAMILY, 5)
    return nlmsghdr(16 + 4 + len(echoed), d.NLMSG_ERROR, 0) + i32(-err) + echoed


def nla(attr_type: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return u16(size) + u16(attr_type) + payload + bytes(-size % 4)


SERVER = ("10.0.0.1", 8080)
CLIENT = ("192.168.7.42", 51234)


# ------------------------------------------------------------------ constants


def test_constants_match_the_uapi_headers():
    assert (d.NETLINK_SOCK_DIAG, d.SOCK_DIAG_BY_FAMILY, d.SOCK_DESTROY) == (4, 20, 21)
    assert (d.NLMSG_ERROR, d.NLMSG_DONE) == (2, 3)
    assert (d.NLM_F_REQUEST, d.NLM_F_ACK, d.NLM_F_DUMP) == (1, 4, 0x300)
    assert [s.name for s in TcpState] == [
        "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE",
        "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"]
    assert [int(s) for s in TcpState] == list(range(1, 13))
    assert d.ALL_STATES == ALL
    assert d.CONNECTION_STATES == ALL & ~(1 << 10)


def test_state_mask():
    assert d.state_mask([TcpState.ESTABLISHED, TcpState.TIME_WAIT]) == 0b1000010
    assert d.state_mask([TcpState.LISTEN, TcpState.LISTEN]) == 1 << 10
    assert d.state_mask([]) == 0
    with pytest.raises(ValueError):
        d.state_mask([13])


# ------------------------------------------------------------------ requests


def test_dump_request_bytes():
    states = d.state_mask([TcpState.ESTABLISHED, TcpState.TIME_WAIT])
    expected = nlmsghdr(72, 20, d.NLM_F_REQUEST | d.NLM_F_DUMP, seq=7) + TCP_REQUEST_HEAD + u32(states) + bytes(48)
    assert len(expected) == 16 + 56
    assert d.dump_request(states, seq=7) == expected


def test_dump_request_with_local_port_carries_the_port_filter():
    # INET_DIAG_REQ_BYTECODE: {S_GE, yes=8, no=20} {port} {S_LE, yes=8, no=12} {port}
    def op(code: int, yes: int, no: int) -> bytes:
        return u8(code) + u8(yes) + u16(no)

    bytecode = op(2, 8, 20) + op(0, 0, 8080) + op(3, 8, 12) + op(0, 0, 8080)
    attribute = u16(4 + 16) + u16(1) + bytecode
    expected = (nlmsghdr(16 + 56 + 20, 20, 0x301, seq=3) + TCP_REQUEST_HEAD + u32(d.CONNECTION_STATES) + bytes(48)
                + attribute)
    assert d.dump_request(d.CONNECTION_STATES, local_port=8080, seq=3) == expected


def test_lookup_request_bytes():
    # No ACK: the one reply (the socket or an NLMSG_ERROR) ends the exchange.
    expected = (nlmsghdr(72, 20, d.NLM_F_REQUEST, seq=9) + TCP_REQUEST_HEAD + u32(ALL)
                + sockid(SERVER, CLIENT, cookie=NOCOOKIE))
    assert d.lookup_request(SERVER, CLIENT, seq=9) == expected
    # network order on the wire: 8080 = 0x1f90, 10.0.0.1
    assert expected[16 + 8:16 + 8 + 8] == b"\x1f\x90\xc8\x22\x0a\x00\x00\x01"


def test_destroy_request_bytes():
    cookie = 0x1122334455667788
    expected = (nlmsghdr(72, 21, d.NLM_F_REQUEST | d.NLM_F_ACK, seq=2) + TCP_REQUEST_HEAD + u32(ALL)
                + sockid(SERVER, CLIENT, cookie=(0x55667788, 0x11223344)))
    assert d.destroy_request(SERVER, CLIENT, cookie, seq=2) == expected
    no_cookie = d.destroy_request(SERVER, CLIENT, seq=2)
    assert no_cookie[-8:] == b"\xff" * 8


@pytest.mark.parametrize("local", [("10.0.0.1", -1), ("10.0.0.1", 65536), ("10.0.0.1", "80"), ("::1", 80),
                                   ("10.0.0", 80), ("example.com", 80), (None, 80)])
def test_bad_addresses_are_refused(local):
    with pytest.raises(ValueError):
        d.lookup_request(local, CLIENT)


@pytest.mark.parametrize("kwargs", [{"states": 0}, {"states": 1 << 13}, {"states": 1},
                                    {"states": 2, "local_port": 0}, {"states": 2, "local_port": 65536}])
def test_bad_dump_requests_are_refused(kwargs):
    with pytest.raises(ValueError):
        d.dump_request(**kwargs)


def test_bad_cookie_is_refused():
    with pytest.raises(ValueError):
        d.destroy_request(SERVER, CLIENT, cookie=1 << 64)


# ------------------------------------------------------------------ the port filter, as the kernel runs it


def kernel_audit(bc: bytes) -> bool:
    """inet_diag_bc_audit for the ops the filter uses (port comparisons)."""
    length = len(bc)
    at = 0
    while length > 0:
        code, yes, no = bc[at], bc[at + 1], int.from_bytes(bc[at + 2:at + 4], sys.byteorder)
        if code not in (d.INET_DIAG_BC_S_GE, d.INET_DIAG_BC_S_LE):
            return False
        min_len = 8  # the op and its port operand
        if length < min_len:
            return False
        if no < min_len or no > length + 4 or no & 3:
            return False
        if yes < min_len or yes > length + 4 or yes & 3:
            return False
        at += yes
        length -= yes
    return length == 0


def kernel_run(bc: bytes, sport: int) -> bool:
    """inet_diag_bc_run: follow yes/no jumps; accepted iff exactly the end is reached."""
    length = len(bc)
    at = 0
    while length > 0:
        code, yes, no = bc[at], bc[at + 1], int.from_bytes(bc[at + 2:at + 4], sys.byteorder)
        port = int.from_bytes(bc[at + 6:at + 8], sys.byteorder)
        hit = sport >= port if code == d.INET_DIAG_BC_S_GE else sport <= port
        step = yes if hit else no
        at += step
        length -= step
    return length == 0


@given(port=st.integers(1, 0xFFFF), sport=st.integers(0, 0xFFFF))
def test_port_filter_accepts_exactly_its_port(port, sport):
    bc = d.source_port_bytecode(port)
    assert kernel_audit(bc)
    assert kernel_run(bc, sport) == (sport == port)


# ------------------------------------------------------------------ parsing replies


def test_parse_several_messages_then_done():
    data = (diag_msg(SERVER, CLIENT, 1, cookie=(7 << 32) | 9, rqueue=5, wqueue=6, uid=1000, inode=4242,
                     attributes=nla(8, b"\x00") + nla(21, bytes(8)))
            + diag_msg(("10.0.0.1", 8080), ("0.0.0.0", 0), 10, wqueue=128, inode=99)
            + diag_msg(SERVER, ("10.9.9.9", 1), 6)
            + done())
    sockets, finished, err = d.parse_messages(data)
    assert finished and err is None
    assert sockets == [
        TcpSocket(SERVER, CLIENT, TcpState.ESTABLISHED, inode=4242, uid=1000, rqueue=5, wqueue=6, cookie=(7 << 32) | 9),
        TcpSocket(SERVER, ("0.0.0.0", 0), TcpState.LISTEN, inode=99, uid=0, rqueue=0, wqueue=128, cookie=0),
        TcpSocket(SERVER, ("10.9.9.9", 1), TcpState.TIME_WAIT, inode=0, uid=0, rqueue=0, wqueue=0, cookie=0),
    ]
    assert all(type(s.state) is TcpState for s in sockets)


def test_parse_accepts_memoryview_and_a_part_of_a_dump():
    data = bytearray(diag_msg(SERVER, CLIENT, 8) * 3)
    sockets, finished, err = d.parse_messages(memoryview(data))
    assert len(sockets) == 3 and not finished and err is None
    assert {s.state for s in sockets} == {TcpState.CLOSE_WAIT}


def test_parse_unpadded_last_message_and_padding_between():
    odd = diag_msg(SERVER, CLIENT, 1, attributes=u16(5) + u16(8) + b"\x01")  # length 93: 3 bytes of padding follow
    assert len(odd) % 4 == 1
    sockets, _, _ = d.parse_messages(odd + bytes(3) + odd)
    assert len(sockets) == 2


def test_parse_error_gives_errno():
    request = d.lookup_request(SERVER, CLIENT)
    assert d.parse_messages(error(errno.ENOENT, request)) == ([], False, errno.ENOENT)
    assert d.parse_messages(error(errno.EOPNOTSUPP)) == ([], False, errno.EOPNOTSUPP)


def test_parse_ack_is_errno_zero():
    reply = diag_msg(SERVER, CLIENT, 1) + error(0)
    sockets, finished, err = d.parse_messages(reply)
    assert len(sockets) == 1 and not finished and err == 0


def test_parse_done_with_an_error():
    assert d.parse_messages(done(-errno.ENOBUFS)) == ([], True, errno.ENOBUFS)


def test_parse_skips_noop():
    assert d.parse_messages(nlmsghdr(16, d.NLMSG_NOOP, 0) + done()) == ([], True, None)


def test_parse_empty():
    assert d.parse_messages(b"") == ([], False, None)


@pytest.mark.parametrize("cut", [1, 15, 16, 17, 40, 87])
def test_truncated_buffer_is_a_clear_error(cut):
    message = diag_msg(SERVER, CLIENT, 1)
    assert len(message) == 88
    with pytest.raises(ValueError, match="truncated|length"):
        d.parse_messages(done() + message[:cut])


@pytest.mark.parametrize("data, match", [
    (nlmsghdr(12, d.NLMSG_DONE, 0), "length"),  # nlmsg_len smaller than the header
    (nlmsghdr(16 + 40, d.SOCK_DIAG_BY_FAMILY, 0) + bytes(40), "truncated inet_diag_msg"),
    (nlmsghdr(16 + 2, d.NLMSG_ERROR, 0) + bytes(2) + bytes(2), "truncated NLMSG_ERROR"),
    (nlmsghdr(16, 0x99, 0), "unexpected netlink message type"),
    (diag_msg(SERVER, CLIENT, 13), "unknown TCP state"),
    (diag_msg(SERVER, CLIENT, 0), "unknown TCP state"),
])
def test_malformed_messages(data, match):
    with pytest.raises(ValueError, match=match):
        d.parse_messages(data)


def test_non_ipv4_message_is_refused():
    message = bytearray(diag_msg(SERVER, CLIENT, 1))
    message[16] = socket.AF_INET6
    with pytest.raises(ValueError, match="family"):
        d.parse_messages(bytes(message))


# ------------------------------------------------------------------ round trips

ipv4 = st.integers(0, 0xFFFFFFFF).map(lambda n: socket.inet_ntoa(n.to_bytes(4, "big")))
endpoint = st.tuples(ipv4, st.integers(0, 0xFFFF))
cookie = st.one_of(st.none(), st.integers(0, (1 << 64) - 1))


@given(local=endpoint, remote=endpoint, ifindex=st.integers(0, 0xFFFFFFFF), cookie=cookie)
def test_sockid_round_trip(local, remote, ifindex, cookie):
    encoded = d.encode_sockid(local, remote, ifindex, cookie)
    expected_cookie = NOCOOKIE if cookie is None else (cookie & 0xFFFFFFFF, cookie >> 32)
    assert encoded == sockid(local, remote, ifindex, expected_cookie)  # the layout by hand
    assert d.decode_sockid(b"pad" + encoded, 3) == (local, remote, ifindex, d.NO_COOKIE if cookie is None else cookie)


@given(st.lists(st.tuples(endpoint, endpoint, st.sampled_from(list(TcpState)), st.integers(0, (1 << 64) - 1),
                          st.integers(0, 0xFFFFFFFF)), max_size=20))
def test_reply_round_trip(rows):
    data = b"".join(diag_msg(local, remote, state, cookie=c, inode=inode) for local, remote, state, c, inode in rows)
    sockets, finished, err = d.parse_messages(data + done())
    assert finished and err is None
    assert [(s.local, s.remote, s.state, s.cookie, s.inode) for s in sockets] == rows


def test_decode_sockid_truncated():
    with pytest.raises(ValueError, match="truncated"):
        d.decode_sockid(bytes(47))


# ------------------------------------------------------------------ tcp_info (notsent)


def test_notsent_offset_matches_the_tcp_info_layout():
    import struct

    from handoff.tcpstate import _TCP_INFO_LAYOUT

    codes = ""
    for name, code in _TCP_INFO_LAYOUT:
        if name == "notsent_bytes":
            break
        codes += code
    assert struct.calcsize("@" + codes) == d.TCP_INFO_NOTSENT_AT


def test_lookup_request_asks_for_tcp_info_with_the_ext_bit():
    plain, with_info = d.lookup_request(SERVER, CLIENT), d.lookup_request(SERVER, CLIENT, info=True)
    assert plain[16 + 2] == 0 and with_info[16 + 2] == 1 << (d.INET_DIAG_INFO - 1)
    assert plain[:18] == with_info[:18] and plain[19:] == with_info[19:]


def test_notsent_is_read_from_the_info_attribute_among_others():
    info = bytearray(232)
    info[d.TCP_INFO_NOTSENT_AT:d.TCP_INFO_NOTSENT_AT + 4] = u32(70000)
    attributes = nla(8, u8(1)) + nla(d.INET_DIAG_INFO, bytes(info)) + nla(21, u32(5) + u32(0))
    data = diag_msg(SERVER, CLIENT, TcpState.ESTABLISHED, wqueue=9, attributes=attributes) + done()
    (sock,), finished, err = d.parse_messages(data, info=True)
    assert sock.notsent == 70000 and sock.wqueue == 9 and finished
    (plain,), _, _ = d.parse_messages(data)
    assert plain.notsent is None  # not asked: not walked


def test_a_short_info_attribute_gives_no_notsent():
    data = diag_msg(SERVER, CLIENT, TcpState.ESTABLISHED, attributes=nla(d.INET_DIAG_INFO, bytes(100))) + done()
    (sock,), _, _ = d.parse_messages(data, info=True)
    assert sock.notsent is None


def test_a_broken_attribute_is_refused():
    data = diag_msg(SERVER, CLIENT, TcpState.ESTABLISHED, attributes=u16(200) + u16(2) + bytes(4)) + done()
    with pytest.raises(ValueError):
        d.parse_messages(data, info=True)
