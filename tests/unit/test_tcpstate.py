"""handoff/tcpstate.py against the running kernel, on 127.0.0.1 only.

The kernel tests need root (TCP_REPAIR needs CAP_NET_ADMIN, the wire checks an
AF_PACKET socket on lo) and fail, never skip, without it. parse_syn and
parse_tcp_options are also tested on crafted bytes, which needs nothing.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from handoff import tcpstate as ts
from handoff.rebuild import SocketPlan, ms_clock, rebuild_socket
from handoff.tcpstate import TcpState

LOOPBACK = "127.0.0.1"
MOD = 1 << 32


def signed_diff(a: int, b: int) -> int:
    """a - b for 32-bit wrapping counters, in [-2**31, 2**31)."""
    return (a - b + (1 << 31)) % MOD - (1 << 31)


def wait_until(predicate: Callable[[], object], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# --- A capture of lo, to see what went on the wire ---

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
FIN, SYN, RST = 0x01, 0x02, 0x04


@dataclass(frozen=True)
class Segment:
    sport: int
    dport: int
    seq: int
    flags: int
    payload: int
    options: ts.TcpOptions


class LoCapture:
    """Every TCP/IPv4 segment crossing lo from now on (each once: loopback
    frames are seen leaving and arriving, the leaving copy is dropped)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.setblocking(False)

    def segments(self, ports: set[int], settle: float = 0.2) -> list[Segment]:
        """Segments between any of ``ports``, after waiting ``settle`` s for stragglers."""
        found: list[Segment] = []
        deadline = time.monotonic() + settle
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                continue
            frame, addr = self.sock.recvfrom(65536)
            if addr[2] == PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            if ip[9] != socket.IPPROTO_TCP:
                continue
            ihl = (ip[0] & 0x0F) * 4
            tcp = ip[ihl:]
            sport, dport, seq, _ack, off, flags = struct.unpack_from("!HHIIBB", tcp)
            if sport in ports and dport in ports:
                doff = (off >> 4) * 4
                total = struct.unpack_from("!H", ip, 2)[0]
                found.append(Segment(sport, dport, seq, flags, total - ihl - doff,
                                     ts.parse_tcp_options(tcp[20:doff])))
        return found

    def close(self) -> None:
        self.sock.close()


# --- Fixtures ---

@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.fail("tcpstate tests need root: TCP_REPAIR needs CAP_NET_ADMIN")


class Net:
    """Loopback sockets of one test, all closed at teardown."""

    def __init__(self) -> None:
        self.closers: list[Callable[[], None]] = []

    def track(self, sock: socket.socket) -> socket.socket:
        self.closers.append(sock.close)  # close() of a closed socket is a no-op
        return sock

    def listener(self, *, save_syn: bool = True, rcvbuf: int | None = None) -> socket.socket:
        sock = self.track(socket.socket())
        if rcvbuf is not None:  # inherited by accepted sockets
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((LOOPBACK, 0))
        if save_syn:
            ts.enable_saved_syn(sock)
        sock.listen()
        return sock

    def pair(self, *, listener: socket.socket | None = None,
             before_connect: Callable[[socket.socket], None] | None = None
             ) -> tuple[socket.socket, socket.socket]:
        """(client, server) of an established loopback connection."""
        listener = listener or self.listener()
        client = self.track(socket.socket())
        if before_connect:
            before_connect(client)
        client.settimeout(2)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        self.track(server).settimeout(2)
        return client, server

    def capture(self) -> LoCapture:
        cap = LoCapture()
        self.closers.append(cap.close)
        return cap

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


@pytest.fixture
def net(root: None) -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


def ports(*socks: socket.socket) -> set[int]:
    return {s.getsockname()[1] for s in socks}


# --- Constants and layout ---

HEADER_CONSTANTS = {
    "/usr/include/linux/tcp.h": {
        "TCP_REPAIR": ts.TCP_REPAIR, "TCP_REPAIR_QUEUE": ts.TCP_REPAIR_QUEUE,
        "TCP_QUEUE_SEQ": ts.TCP_QUEUE_SEQ, "TCP_REPAIR_OPTIONS": ts.TCP_REPAIR_OPTIONS,
        "TCP_TIMESTAMP": ts.TCP_TIMESTAMP, "TCP_SAVE_SYN": ts.TCP_SAVE_SYN,
        "TCP_SAVED_SYN": ts.TCP_SAVED_SYN, "TCP_REPAIR_ON": ts.TCP_REPAIR_ON,
        "TCP_REPAIR_OFF": ts.TCP_REPAIR_OFF, "TCP_REPAIR_OFF_NO_WP": ts.TCP_REPAIR_OFF_NO_WP,
        "TCPI_OPT_TIMESTAMPS": ts.TCPI_OPT_TIMESTAMPS, "TCPI_OPT_SACK": ts.TCPI_OPT_SACK,
        "TCPI_OPT_WSCALE": ts.TCPI_OPT_WSCALE,
    },
    "/usr/include/linux/sockios.h": {"SIOCOUTQNSD": ts.SIOCOUTQNSD},
}


def test_constants_match_kernel_headers() -> None:
    checked = 0
    for header, expected in HEADER_CONSTANTS.items():
        if not Path(header).exists():
            continue
        text = Path(header).read_text()
        for name, value in expected.items():
            m = re.search(rf"#define\s+{name}\s+(-?\w+)", text)
            assert m, f"{name} not in {header}"
            assert int(m.group(1), 0) == value, name
            checked += 1
    tcp_h = Path("/usr/include/linux/tcp.h")
    if tcp_h.exists():  # the queue enum: TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE
        m = re.search(r"enum\s*{\s*TCP_NO_QUEUE,\s*TCP_RECV_QUEUE,\s*TCP_SEND_QUEUE,", tcp_h.read_text())
        assert m and (ts.TCP_NO_QUEUE, ts.TCP_RECV_QUEUE, ts.TCP_SEND_QUEUE) == (0, 1, 2)
    sockios = Path("/usr/include/linux/sockios.h")
    if sockios.exists():
        text = sockios.read_text()
        assert re.search(r"#define\s+SIOCINQ\s+FIONREAD", text) and ts.SIOCINQ == 0x541B
        assert re.search(r"#define\s+SIOCOUTQ\s+TIOCOUTQ", text) and ts.SIOCOUTQ == 0x5411
    assert checked or not any(Path(h).exists() for h in HEADER_CONSTANTS)


def btf_tcp_info() -> tuple[int, dict[str, int]]:
    """(size, {member: bit offset}) of the running kernel's struct tcp_info."""
    tool = shutil.which("bpftool") or pytest.fail("bpftool is needed (apt-get install bpftool)")
    text = subprocess.run([tool, "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                          capture_output=True, text=True, check=True).stdout
    head = re.search(r"STRUCT 'tcp_info' size=(\d+) vlen=\d+\n((?:\s+'.*\n)+)", text)
    assert head, "struct tcp_info not in the kernel's BTF"
    members = dict((name, int(bits)) for name, bits in
                   re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", head.group(2)))
    return int(head.group(1)), members


def test_tcp_info_layout_matches_running_kernel() -> None:
    size, members = btf_tcp_info()
    assert size >= ts.TCP_INFO_MIN_LEN
    for name, offset in ts.tcp_info_offsets().items():
        if not name.startswith("_"):
            assert members[f"tcpi_{name}"] == offset * 8, name
    # The bitfield byte: snd_wscale in the low nibble, rcv_wscale in the high one.
    assert ts.tcp_info_offsets()["_wscale"] == 6
    assert members["tcpi_snd_wscale"] == 48 and members["tcpi_rcv_wscale"] == 52
    assert members["tcpi_delivery_rate_app_limited"] == 56
    # announced_window reads tcpi_rcv_wnd right after the parsed layout.
    assert members["tcpi_rcv_wnd"] == ts.TCP_INFO_MIN_LEN * 8


def test_announced_window_is_what_the_socket_offers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            peer, _ = listener.accept()
            with peer:
                window = ts.announced_window(client)
                # The peer saw it (scaled, from the handshake's last ACK) as its send window.
                assert window is not None and window > 0
                assert ts.tcp_info(peer).snd_wnd == window


# --- TCP_INFO ---

def small_rcvbuf(sock: socket.socket) -> None:
    """A small receive buffer before connect makes the client announce a small
    window shift, so the two shifts of a connection differ."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


def test_tcp_info_both_ends_agree(net: Net) -> None:
    client, server = net.pair(before_connect=small_rcvbuf)
    syn = ts.parse_syn(ts.saved_syn(server) or b"")
    c, s = ts.tcp_info(client), ts.tcp_info(server)
    assert c.tcp_state is TcpState.ESTABLISHED and s.tcp_state is TcpState.ESTABLISHED
    for info in (c, s):
        assert info.timestamps and info.sack and info.wscale_ok
    assert c.rcv_wscale != c.snd_wscale, "the shifts must differ to tell the nibbles apart"
    assert c.snd_wscale == s.rcv_wscale and c.rcv_wscale == s.snd_wscale
    assert syn.wscale == c.rcv_wscale  # what the client put on the wire
    assert c.snd_mss > 0 and c.rcv_mss > 0 and c.rto > 0 and c.snd_cwnd > 0


def test_tcp_info_counts_bytes(net: Net) -> None:
    client, server = net.pair()
    client.sendall(b"a" * 1000)
    assert len(server.recv(4096, socket.MSG_WAITALL)) == 1000
    wait_until(lambda: ts.tcp_info(client).bytes_acked >= 1000)
    assert ts.tcp_info(client).unacked == 0 and ts.tcp_info(server).bytes_received == 1000


def test_parse_tcp_info_rejects_short_buffer() -> None:
    with pytest.raises(ValueError):
        ts.parse_tcp_info(bytes(100))


# --- Queues ---

def test_queued_counts_unread_and_unacked(net: Net) -> None:
    listener = net.listener(rcvbuf=4096)
    client, server = net.pair(listener=listener)
    assert ts.queued(client) == (0, 0, 0) and ts.queued(server) == (0, 0, 0)
    client.sendall(b"x" * 100)
    wait_until(lambda: ts.queued(server)[0] == 100)
    assert ts.queued(client) == (0, 0, 0)
    # The server does not read; its window closes and the client's bytes wait.
    client.setblocking(False)
    try:
        while True:
            client.send(b"y" * 65536)
    except BlockingIOError:
        pass
    inq, outq, not_sent = ts.queued(client)
    assert inq == 0 and outq > 0 and 0 < not_sent <= outq
    assert ts.queued(server)[0] > 100


# --- Sequence numbers ---

def test_read_sequence_matches_the_peer(net: Net) -> None:
    client, server = net.pair()
    syn = ts.parse_syn(ts.saved_syn(server) or b"")
    c_snd, c_rcv = ts.read_sequence(client)
    s_snd, s_rcv = ts.read_sequence(server)
    assert c_snd == s_rcv == (syn.seq + 1) % MOD  # the SYN takes one sequence number
    assert s_snd == c_rcv

    client.sendall(b"q" * 1234)
    assert len(server.recv(4096, socket.MSG_WAITALL)) == 1234
    server.sendall(b"r" * 77)
    assert len(client.recv(4096, socket.MSG_WAITALL)) == 77
    wait_until(lambda: ts.queued(client)[1] == 0 and ts.queued(server)[1] == 0)

    c2, s2 = ts.read_sequence(client), ts.read_sequence(server)
    assert c2 == ((c_snd + 1234) % MOD, (c_rcv + 77) % MOD)
    assert s2 == (c2[1], c2[0])
    # Repair mode was left: the connection works as before.
    assert not ts.in_repair(client) and not ts.in_repair(server)
    client.sendall(b"after")
    assert server.recv(5, socket.MSG_WAITALL) == b"after"


def test_read_sequence_keeps_repair_mode_it_did_not_enter(net: Net) -> None:
    client, _server = net.pair()
    ts.enter_repair(client)
    ts.read_sequence(client)
    assert ts.in_repair(client)
    ts.leave_repair(client)
    assert not ts.in_repair(client)


def repaired_socket(net: Net, snd: int, rcv: int) -> socket.socket:
    sock = net.track(socket.socket())
    ts.enter_repair(sock)
    sock.bind((LOOPBACK, 0))
    for queue, seq in ((ts.TCP_SEND_QUEUE, snd), (ts.TCP_RECV_QUEUE, rcv)):
        sock.setsockopt(socket.IPPROTO_TCP, ts.TCP_REPAIR_QUEUE, queue)
        sock.setsockopt(socket.IPPROTO_TCP, ts.TCP_QUEUE_SEQ, struct.pack("=I", seq))
    return sock


def test_read_sequence_wraps_modulo_2_32(net: Net) -> None:
    """A connection built in repair mode (as CRIU restores one), with the
    client's sequence numbers 10 bytes before 2**32: values above 2**31 come
    back unsigned and wrap past zero."""
    x, y = MOD - 10, (1 << 31) + 5
    a, b = repaired_socket(net, x, y), repaired_socket(net, y, x)
    a.connect(b.getsockname())  # in repair mode: ESTABLISHED, no handshake
    b.connect(a.getsockname())
    assert ts.read_sequence(a) == (x, y) and ts.read_sequence(b) == (y, x)
    ts.leave_repair(a)  # the window probes tell each side the other's window
    ts.leave_repair(b)
    a.settimeout(2)
    b.settimeout(2)
    a.sendall(b"w" * 20)
    assert b.recv(20, socket.MSG_WAITALL) == b"w" * 20
    wait_until(lambda: ts.queued(a)[1] == 0)
    assert ts.read_sequence(a) == (10, y) and ts.read_sequence(b) == (y, 10)


def test_leaving_repair_sends_a_window_probe_unless_asked_not_to(net: Net) -> None:
    client, server = net.pair()
    time.sleep(0.05)  # let the handshake's last ACK settle
    for probe, expected in ((True, 1), (False, 0)):
        before_c, before_s = ts.tcp_info(client), ts.tcp_info(server)
        ts.enter_repair(client)
        ts.leave_repair(client, window_probe=probe)
        time.sleep(0.05)
        after_c, after_s = ts.tcp_info(client), ts.tcp_info(server)
        assert after_c.segs_out - before_c.segs_out == expected
        assert after_s.segs_in - before_s.segs_in == expected


def test_leaving_repair_clears_so_reuseaddr(net: Net) -> None:
    client, _server = net.pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ts.read_sequence(client)
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0


# --- Timestamp clock ---

def test_ts_clock_is_a_millisecond_clock(net: Net) -> None:
    client, _server = net.pair()
    readings = []
    for _ in range(20):
        readings.append(ts.ts_clock(client))
        time.sleep(0.001)
    steps = [signed_diff(b, a) for a, b in zip(readings, readings[1:])]
    assert all(0 <= step <= 50 for step in steps)
    assert not any(ts.ts_usec(r) for r in readings)  # ms mode: the unit bit is clear
    start = ts.ts_clock(client)
    time.sleep(0.25)
    assert 230 <= signed_diff(ts.ts_clock(client), start) <= 400


def test_ts_clock_matches_the_tsval_of_the_syn(net: Net) -> None:
    """tsoffset is random per address pair: compare within one connection.
    The clock reads what the SYN carried plus the milliseconds since it left,
    which a loaded machine can stretch: bounded by the time measured around."""
    started = time.monotonic()
    client, server = net.pair()
    now = ts.ts_clock(client)
    elapsed_ms = (time.monotonic() - started) * 1000
    syn = ts.parse_syn(ts.saved_syn(server) or b"")
    assert syn.tsval is not None
    assert -2 <= signed_diff(now, syn.tsval) <= elapsed_ms + 2


def test_ts_clock_matches_the_tsval_on_the_wire(net: Net) -> None:
    client, server = net.pair()
    capture = net.capture()
    before = ts.ts_clock(client)
    client.sendall(b"stamp")
    after = ts.ts_clock(client)
    assert server.recv(5, socket.MSG_WAITALL) == b"stamp"
    sent = [seg for seg in capture.segments(ports(client, server))
            if seg.sport == client.getsockname()[1] and seg.payload == 5]
    assert len(sent) == 1 and sent[0].options.tsval is not None
    tsval = sent[0].options.tsval
    # The reading has its low (unit) bit cleared: it may trail by one tick.
    assert signed_diff(tsval, before) >= 0 and signed_diff(after, tsval) >= -1


# --- Saved SYN ---

def test_saved_syn_reports_the_clients_options(net: Net) -> None:
    def set_mss(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)

    client, server = net.pair(before_connect=set_mss)
    raw = ts.saved_syn(server)
    assert raw is not None
    syn = ts.parse_syn(raw)
    assert (syn.saddr, syn.sport) == client.getsockname()
    assert (syn.daddr, syn.dport) == server.getsockname()
    assert syn.mss == 1000
    assert syn.wscale == ts.tcp_info(client).rcv_wscale
    assert syn.sack_permitted and syn.tsval is not None and syn.tsecr == 0
    assert ts.saved_syn(server) is None  # the kernel hands it out once


def test_saved_syn_is_none_without_enable(net: Net) -> None:
    _client, server = net.pair(listener=net.listener(save_syn=False))
    assert ts.saved_syn(server) is None


# --- parse_syn / parse_tcp_options on crafted bytes ---

MSS_1460 = b"\x02\x04\x05\xb4"
SACK_PERM = b"\x04\x02"
TS_OPT = b"\x08\x0a" + struct.pack("!II", 0xDEADBEEF, 0)
WS_7 = b"\x03\x03\x07"
NOP = b"\x01"
LINUX_OPTIONS = MSS_1460 + SACK_PERM + TS_OPT + NOP + WS_7  # 20 bytes, as Linux sends


def craft_syn(tcp_options: bytes = LINUX_OPTIONS, ip_options: bytes = b"",
              flags: int = SYN, version: int = 4, proto: int = 6) -> bytes:
    assert len(tcp_options) % 4 == 0 and len(ip_options) % 4 == 0
    ihl = 5 + len(ip_options) // 4
    doff = 5 + len(tcp_options) // 4
    total = ihl * 4 + doff * 4
    ip = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, total, 1, 0x4000, 64, proto, 0,
                     socket.inet_aton("10.1.2.3"), socket.inet_aton("10.9.8.7")) + ip_options
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 0xFFFFFFF0, 0, doff << 4, flags, 65535, 0, 0)
    return ip + tcp + tcp_options


def test_parse_syn_linux_options() -> None:
    syn = ts.parse_syn(craft_syn())
    assert syn == ts.SynInfo(saddr="10.1.2.3", daddr="10.9.8.7", sport=40000, dport=80,
                             seq=0xFFFFFFF0, mss=1460, wscale=7, sack_permitted=True,
                             tsval=0xDEADBEEF, tsecr=0)


def test_parse_syn_honours_ip_options() -> None:
    router_alert = b"\x94\x04\x00\x00"
    syn = ts.parse_syn(craft_syn(ip_options=router_alert + NOP * 3 + b"\x00"))
    assert (syn.sport, syn.dport, syn.mss, syn.wscale, syn.tsval) == (40000, 80, 1460, 7, 0xDEADBEEF)


def test_parse_syn_without_timestamps() -> None:
    # What a SYN looks like with net.ipv4.tcp_timestamps=0.
    syn = ts.parse_syn(craft_syn(MSS_1460 + NOP + NOP + SACK_PERM + NOP + WS_7))
    assert syn.tsval is None and syn.tsecr is None
    assert syn.mss == 1460 and syn.wscale == 7 and syn.sack_permitted


def test_parse_syn_minimal() -> None:
    syn = ts.parse_syn(craft_syn(b""))
    assert (syn.mss, syn.wscale, syn.sack_permitted, syn.tsval) == (None, None, False, None)


def test_parse_tcp_options_skips_unknown_and_stops_at_eol() -> None:
    unknown = b"\x1e\x06abcd"  # kind 30 (MPTCP), 6 bytes
    opts = ts.parse_tcp_options(NOP + unknown + MSS_1460 + b"\x00" + b"\x05\x00garbage")
    assert opts == ts.TcpOptions(mss=1460)


@pytest.mark.parametrize("options", [
    b"\x1e\x00\x01\x01",      # length 0 would loop forever
    b"\x1e\x01\x01\x01",      # length 1 is shorter than kind+length
    b"\x01\x01\x1e\x08ab",    # runs past the end
    b"\x02\x03\x05\x01",      # MSS must be 4 bytes
    b"\x03\x04\x07\x01",      # WS must be 3 bytes
    b"\x08\x06\x00\x00\x00\x00",  # TS must be 10 bytes
    b"\x01\x01\x01\x02",      # MSS kind without a length byte
])
def test_parse_tcp_options_rejects_malformed_lengths(options: bytes) -> None:
    with pytest.raises(ValueError):
        ts.parse_tcp_options(options)
    padded = options + NOP * (-len(options) % 4)
    with pytest.raises(ValueError):
        ts.parse_syn(craft_syn(padded))


@pytest.mark.parametrize("headers", [
    craft_syn()[:19],                  # shorter than an IP header
    craft_syn(version=6),              # not IPv4
    craft_syn(proto=17),               # not TCP
    craft_syn(flags=0x10),             # an ACK, not a SYN
    craft_syn()[:30],                  # TCP header cut short
    craft_syn()[:-4],                  # data offset past the end
    b"\x4f" + craft_syn()[1:40],       # IHL 60 past the end
])
def test_parse_syn_rejects_malformed_headers(headers: bytes) -> None:
    with pytest.raises(ValueError):
        ts.parse_syn(headers)


# --- Closing silently ---

def assert_peer_sees_nothing(server: socket.socket, client_port: int,
                             capture: LoCapture) -> None:
    server.settimeout(0.3)
    with pytest.raises(TimeoutError):
        server.recv(1)  # neither b"" (FIN) nor ConnectionResetError (RST)
    assert ts.tcp_info(server).tcp_state is TcpState.ESTABLISHED
    sent = [seg for seg in capture.segments({client_port, server.getsockname()[1]}, settle=0)
            if seg.sport == client_port]
    assert sent == []


def test_close_silently_sends_neither_fin_nor_rst(net: Net) -> None:
    client, server = net.pair()
    port = client.getsockname()[1]
    capture = net.capture()
    ts.close_silently(client)
    assert client.fileno() == -1
    assert_peer_sees_nothing(server, port, capture)


def test_normal_close_is_seen_by_the_peer(net: Net) -> None:
    client, server = net.pair()
    capture = net.capture()
    client.close()
    assert server.recv(1) == b""
    assert ts.tcp_info(server).tcp_state is TcpState.CLOSE_WAIT
    flags = [seg.flags for seg in capture.segments(ports(server) | {client_port(server)})
             if seg.sport == client_port(server)]
    assert any(f & FIN for f in flags)


def client_port(server: socket.socket) -> int:
    return server.getpeername()[1]


def test_close_fd_silently(net: Net) -> None:
    client, server = net.pair()
    port = client.getsockname()[1]
    fd = client.detach()
    capture = net.capture()
    ts.close_fd_silently(fd)
    with pytest.raises(OSError):
        os.fstat(fd)
    assert_peer_sees_nothing(server, port, capture)


def test_close_silently_with_a_dup_waits_for_the_last_descriptor(net: Net) -> None:
    """The engine's pattern: repair mode through its own dup, then the
    transport closes the original fd; nothing goes out either way."""
    client, server = net.pair()
    port = client.getsockname()[1]
    mine = net.track(socket.socket(fileno=os.dup(client.fileno())))
    capture = net.capture()
    ts.close_silently(mine)
    assert ts.in_repair(client)  # the socket lives on through the original fd
    client.close()
    assert_peer_sees_nothing(server, port, capture)


def test_borrowed_leaves_the_fd_open(net: Net) -> None:
    client, server = net.pair()
    with ts.borrowed(client.fileno()) as sock:
        assert ts.tcp_info(sock).tcp_state is TcpState.ESTABLISHED
        assert sock.getpeername() == client.getpeername()
    client.sendall(b"still")
    assert server.recv(5, socket.MSG_WAITALL) == b"still"


# --- Snapshot and eligibility ---

def test_snapshot_of_an_idle_connection(net: Net) -> None:
    client, server = net.pair()
    syn = ts.parse_syn(ts.saved_syn(server) or b"")
    snd, rcv = ts.read_sequence(server)
    snap = ts.snapshot(server, saved_syn_tsval=syn.tsval)
    info = ts.tcp_info(server)
    tcp = snap.tcp
    assert tcp.local == server.getsockname() and tcp.remote == client.getsockname()
    assert (tcp.snd_nxt, tcp.rcv_nxt) == (snd, rcv)
    assert (tcp.snd_wscale, tcp.rcv_wscale, tcp.mss) == (info.snd_wscale, info.rcv_wscale,
                                                           info.snd_mss)
    assert tcp.timestamps and tcp.sack and snap.state == TcpState.ESTABLISHED
    assert 0 <= signed_diff(ts.ts_clock(server), tcp.ts_clock) <= 20
    assert (snap.inq, snap.outq, snap.outq_not_sent, snap.urgent) == (0, 0, 0, False)
    assert snap.syn_tsval == syn.tsval
    assert snap.ineligible() is None and ts.ineligible(server) is None
    assert not ts.in_repair(server)


def test_unread_data_is_ineligible(net: Net) -> None:
    client, server = net.pair()
    client.sendall(b"pending")
    wait_until(lambda: ts.queued(server)[0] == 7)
    assert ts.ineligible(server) == "unread-data"
    assert ts.snapshot(server).ineligible() == "unread-data"
    server.recv(7, socket.MSG_WAITALL)
    assert ts.ineligible(server) is None


def test_unacked_data_is_ineligible(net: Net) -> None:
    client, _server = net.pair(listener=net.listener(rcvbuf=4096))
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        while True:  # the server never reads: its window closes
            client.send(b"z" * 65536)
    assert ts.ineligible(client) == "unacked-data"
    assert ts.snapshot(client).ineligible() == "unacked-data"


def test_half_closed_is_ineligible(net: Net) -> None:
    client, server = net.pair()
    client.shutdown(socket.SHUT_WR)
    assert server.recv(1) == b""
    assert ts.tcp_info(server).tcp_state is TcpState.CLOSE_WAIT
    assert ts.ineligible(server) == "half-closed"
    assert ts.snapshot(server).ineligible() == "half-closed"
    wait_until(lambda: ts.tcp_info(client).tcp_state is TcpState.FIN_WAIT2)
    assert ts.ineligible(client) == "not-established"


def test_urgent_data_is_ineligible(net: Net) -> None:
    client, server = net.pair()
    client.send(b"ab")
    client.send(b"!", socket.MSG_OOB)
    wait_until(lambda: ts.urgent_pending(server))
    assert ts.ineligible(server) == "urgent-data"
    assert server.recv(2, socket.MSG_WAITALL) == b"ab"
    assert ts.queued(server)[0] == 0  # the urgent byte is not in inq...
    assert ts.ineligible(server) == "urgent-data"  # ...but still caught
    server.setblocking(False)  # with a timeout, recv would poll() for in-band data first
    assert server.recv(1, socket.MSG_OOB) == b"!"
    assert ts.ineligible(server) is None


def test_ineligibility_order() -> None:
    assert ts.ineligibility(TcpState.CLOSE_WAIT, 5, 5, True) == "half-closed"
    assert ts.ineligibility(TcpState.SYN_RECV, 0, 0, False) == "not-established"
    assert ts.ineligibility(TcpState.ESTABLISHED, 5, 5, True) == "urgent-data"
    assert ts.ineligibility(TcpState.ESTABLISHED, 5, 5, False) == "unread-data"
    assert ts.ineligibility(TcpState.ESTABLISHED, 0, 5, False) == "unacked-data"
    assert ts.ineligibility(TcpState.ESTABLISHED, 0, 0, False) is None


def test_tcp_basics_agree_with_the_full_tcp_info(net: Net) -> None:
    client, server = net.pair()
    for sock in (client, server):
        info, basics = ts.tcp_info(sock), ts.tcp_basics(sock)
        assert basics == (info.state, info.timestamps, info.sack, info.snd_wscale, info.rcv_wscale,
                          info.snd_mss)


# --- Retransmission bounds (Linux 6.15+) ---

def test_rto_min_problem_names_the_range() -> None:
    assert ts.rto_min_problem(0) is None
    assert ts.rto_min_problem(0.005) is None and ts.rto_min_problem(0.2) is None
    for bad in (0.001, 0.0049, 0.25, 1, -0.02):
        problem = ts.rto_min_problem(bad)
        assert problem is not None and "0.005" in problem and "0.2" in problem and repr(bad) in problem


def test_a_floor_set_before_the_connect_is_the_rto(net: Net) -> None:
    """The handshake's RTT sample already uses the floor: a loopback
    connection's RTO is the floor, not Linux's 200 ms."""
    floored, _ = net.pair(before_connect=lambda s: ts.bound_retransmissions(s, min_us=20_000))
    plain, _ = net.pair()
    assert floored.getsockopt(socket.IPPROTO_TCP, ts.TCP_RTO_MIN_US) == 20_000
    assert ts.rto_us(floored) <= 24_000  # 20 ms, in whole jiffies
    assert ts.rto_us(plain) >= 200_000


def test_bounds_of_zero_change_nothing_and_the_ceiling_is_kept() -> None:
    with socket.socket() as sock:
        before = (sock.getsockopt(socket.IPPROTO_TCP, ts.TCP_RTO_MIN_US),
                  sock.getsockopt(socket.IPPROTO_TCP, ts.TCP_RTO_MAX_MS))
        assert ts.bound_retransmissions(sock) is True
        assert (sock.getsockopt(socket.IPPROTO_TCP, ts.TCP_RTO_MIN_US),
                sock.getsockopt(socket.IPPROTO_TCP, ts.TCP_RTO_MAX_MS)) == before
        assert ts.bound_retransmissions(sock, max_ms=ts.RTO_MAX_LEAST_MS)
        assert sock.getsockopt(socket.IPPROTO_TCP, ts.TCP_RTO_MAX_MS) == ts.RTO_MAX_LEAST_MS
        # Outside what the kernel accepts: its own error, nothing hidden.
        with pytest.raises(OSError):
            ts.bound_retransmissions(sock, min_us=ts.RTO_MIN_RANGE_US[1] + 1)


# --- A rebuilt socket's clock ---

def _rebuilt_clock_rate(clock: int) -> tuple[int, bool]:
    """Ticks a socket rebuilt with TCP_TIMESTAMP = CLOCK counts in 50 ms, and
    whether its readings carry the microsecond flag. Repair mode throughout:
    nothing is sent, the socket closes silently."""
    plan = SocketPlan(local=(LOOPBACK, 0), remote=(LOOPBACK, 9), snd_nxt=1000, rcv_nxt=2000, mss=1400,
                      snd_wscale=7, rcv_wscale=7, sack=True, timestamps=True, ts_clock=clock,
                      snd_wnd=65535, snd_wl1=1999)
    sock = rebuild_socket(plan, window_probe=None)
    try:
        start = ts.ts_clock(sock)
        time.sleep(0.05)
        now = ts.ts_clock(sock)
        return signed_diff(now, start), ts.ts_usec(now)
    finally:
        sock.close()


def test_a_rebuilt_clock_counts_milliseconds_when_its_value_is_even(root: None) -> None:
    """TCP_TIMESTAMP's lowest bit picks the unit (Linux 6.7+): the plans make
    every clock even (handoff/rebuild.py ``ms_clock``); an odd one would run
    in microseconds, a thousand times too fast for the translations."""
    ticks, usec = _rebuilt_clock_rate(ms_clock(123457))
    assert 40 <= ticks <= 200 and not usec
    ticks, usec = _rebuilt_clock_rate(123457)  # the kernel behaviour ms_clock avoids
    assert ticks >= 40_000 and usec
