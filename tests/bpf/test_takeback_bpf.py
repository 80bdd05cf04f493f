"""Taking a connection back, the BPF part: the router's ingress program marks
an entry TAKEBACK on a client segment that carries a request beyond take_from
and hands its bytes to userspace (Capture records of arr_events); the target's
egress program tracks the server's snd_max and window for the agent's answer.

Frames run through the loaded programs with BPF_PROG_TEST_RUN (fixtures in
conftest.py). A test_run frame must fit one page, so the segment larger than
two capture chunks is sent for real: the ingress program is attached to x0
for that one test and the frame arrives from x1.
"""

from __future__ import annotations

import ctypes
import socket
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from arr import netlink
from handoff import packet
from handoff.datapath import read_stats
from handoff.libbpf import RingBuffer
from handoff.maps import (CAPTURE_CHUNK, EV_CAPTURE, EV_RESEND, EV_RST, FLOW_ACTIVE, FLOW_F_FIN, FLOW_F_RST,
                          FLOW_TAKEBACK, HEAD_BYTES, TAIL_BYTES, AckShiftState, Capture, Event, FlowEntry, FlowKey, Xlate)
from handoff.packet import TC_ACT_REDIRECT, TC_ACT_SHOT
from handoff.takeback import assemble
from handoff.translate import Translation

from conftest import X0_MAC, eth

pytestmark = pytest.mark.bpf

MOD = 1 << 32
CLIENT = (("10.9.0.2", 40000), ("10.9.0.100", 80))  # client -> vip
KEY = FlowKey.of(*CLIENT)
TO_TARGET = Translation(saddr="10.9.0.1", daddr="10.9.0.11", sport=50123, dport=8080,
                        seq_delta=MOD - 1000, ack_delta=123456, tsval_delta=1 << 20,
                        tsecr_delta=777, wscale_in=7, wscale_out=7)
FWD = (("10.9.0.11", 8080), ("10.9.0.1", 50123))  # target -> router
FWD_KEY = FlowKey.of(*FWD)
TO_CLIENT = Translation(saddr="10.9.0.100", daddr="10.9.0.2", sport=80, dport=40000,
                        seq_delta=77, ack_delta=MOD - 1000, tsval_delta=5, tsecr_delta=1 << 20,
                        wscale_in=7, wscale_out=7)
CONN_ID = 0x0123456789ABCDEF
TAKE_FROMS = [100_000, MOD - 40]  # one far from the wrap, one whose request crosses it


def wrap(value: int) -> int:
    return value % MOD


def request(n: int) -> bytes:
    """N bytes that differ at every offset a misplaced chunk could land on."""
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def client_frame(seq: int, data: bytes = b"", flags: str = "PA", ack: int = 5555, window: int = 321) -> bytes:
    pkt = eth() / IP(src=CLIENT[0][0], dst=CLIENT[1][0]) / TCP(
        sport=CLIENT[0][1], dport=CLIENT[1][1], flags=flags, seq=seq, ack=ack, window=window,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]) / data
    return bytes(pkt)


def tcp_header(frame: bytes) -> bytes:
    tcp = Ether(frame)[TCP]
    return bytes(tcp)[:tcp.dataofs * 4]


def ingress_entry(take_from: int, state: int = FLOW_ACTIVE, **fields) -> FlowEntry:
    return FlowEntry(x=Xlate.of(TO_TARGET), state=state, take_from=take_from, conn_id=CONN_ID, **fields)


def forwarded(bpf_env, frame: bytes) -> bytes:
    """What the model says the program sends for FRAME (rewritten, next hop's MACs)."""
    verdict, out = packet.forward(frame, TO_TARGET, *bpf_env.next_hop(TO_TARGET.daddr))
    assert verdict == TC_ACT_REDIRECT
    return out


@pytest.fixture(scope="module")
def ring(bpf_env):
    """The router's arr_events: events and captures share it."""
    made = bpf_env.call(lambda: RingBuffer(bpf_env.objects["router"].obj.map_fd("arr_events"), Event, Capture))
    yield made
    made.close()


@pytest.fixture(scope="module")
def target_ring(bpf_env):
    """The target's arr_events: its FIN and RST reports (the snd_max tests send some)."""
    made = bpf_env.call(lambda: RingBuffer(bpf_env.objects["target"].obj.map_fd("arr_events"), Event))
    yield made
    made.close()


@pytest.fixture(autouse=True)
def clean(bpf_env, ring, target_ring):
    """Each test starts with empty rings and leaves no entry and no record behind
    (bpf_env.run leaves its state in the maps)."""
    ring.consume()
    target_ring.consume()
    yield
    ring.consume()
    target_ring.consume()

    def empty() -> None:
        for loaded in bpf_env.objects.values():
            for bpf_map in loaded.maps.values():
                for key in bpf_map.keys():
                    bpf_map.delete(key)
    bpf_env.call(empty)


def captures(ring) -> list[Capture]:
    records = ring.consume()
    assert all(isinstance(r, Capture) for r in records), [type(r).__name__ for r in records]
    return records


def check_captures(records: list[Capture], frame: bytes, seq: int, take_from: int) -> None:
    """Every record is a piece of FRAME from take_from on, with FRAME's TCP header."""
    data = bytes(Ether(frame)[TCP].payload)
    before = wrap(take_from - seq)
    skip = before if 0 < before < 1 << 31 else 0  # bytes routed already: not captured
    assert [r.offset for r in records] == list(range(skip, len(data), CAPTURE_CHUNK))
    for r in records:
        assert (bytes(r.key), r.kind, r.conn_id) == (bytes(KEY), EV_CAPTURE, CONN_ID)
        assert r.header == tcp_header(frame) and r.tcp_len == len(r.header)
        assert r.len == min(CAPTURE_CHUNK, len(data) - r.offset)
        assert r.payload == data[r.offset:r.offset + r.len]
    # What handoff/takeback.py makes of them: the bytes from take_from on.
    if seq == take_from or skip:
        assert assemble(take_from, [(wrap(seq + r.offset), r.payload) for r in records]) == data[skip:]


# ------------------------------------------------------------------ (a) before take_from


@pytest.mark.parametrize("take_from", TAKE_FROMS)
@pytest.mark.parametrize("seq_before, size", [(100, 100), (100, 40), (3, 3)])
def test_payload_before_take_from_is_forwarded(bpf_env, ring, take_from, seq_before, size):
    # A retransmission of the request the router routed: it still ends at or before take_from.
    seq = wrap(take_from - seq_before)
    frame = client_frame(seq, request(size))
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: ingress_entry(take_from)}})
    assert run.verdict == TC_ACT_REDIRECT
    assert run.out == forwarded(bpf_env, frame)
    entry = run.maps["arr_ingress"][KEY]
    assert entry.state == FLOW_ACTIVE and entry.packets == 1
    assert "captured" not in run.stats and ring.consume() == []


@pytest.mark.parametrize("take_from", TAKE_FROMS)
def test_pure_ack_beyond_take_from_is_forwarded_unchanged_in_state(bpf_env, ring, take_from):
    # No payload, no request: an ACTIVE entry stays ACTIVE.
    frame = client_frame(wrap(take_from + 50), flags="A")
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: ingress_entry(take_from)}})
    assert (run.verdict, run.out) == (TC_ACT_REDIRECT, forwarded(bpf_env, frame))
    assert run.maps["arr_ingress"][KEY].state == FLOW_ACTIVE and ring.consume() == []


def test_take_from_zero_never_takes_back(bpf_env, ring):
    frame = client_frame(1000, request(200))
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: ingress_entry(0)}})
    assert run.verdict == TC_ACT_REDIRECT and run.maps["arr_ingress"][KEY].state == FLOW_ACTIVE
    assert ring.consume() == []


# ------------------------------------------------------------------ (b) a new request


@pytest.mark.parametrize("take_from", TAKE_FROMS)
@pytest.mark.parametrize("offset, size", [(0, 300), (-50, 200), (-1, 2), (120, 80)],
                         ids=["at", "straddling", "one-byte-after", "later-segment"])
def test_new_request_is_captured_and_dropped(bpf_env, ring, take_from, offset, size):
    seq = wrap(take_from + offset)
    frame = client_frame(seq, request(size), ack=0xFFFFFFF0, window=4321)
    state = FLOW_ACTIVE if offset <= 0 else FLOW_TAKEBACK  # a later segment: already taking back
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: ingress_entry(take_from, state)}})
    assert run.verdict == TC_ACT_SHOT
    entry = run.maps["arr_ingress"][KEY]
    assert entry.state == FLOW_TAKEBACK
    assert (entry.peer_ack, entry.peer_window) == (0xFFFFFFF0, 4321)
    assert entry.take_from == take_from  # what it was: the rebuilt socket's rcv_nxt
    assert entry.packets == 1  # accounted, though dropped
    assert run.stats.get("captured") == 1 and "capture_lost" not in run.stats
    check_captures(captures(ring), frame, seq, take_from)


def test_two_chunks_of_a_straddling_segment(bpf_env, ring):
    # The largest frame test_run takes is about a page: 2 chunks, starting
    # 500 bytes into the payload (where take_from is).
    take_from = MOD - 100
    seq = wrap(take_from - 500)
    frame = client_frame(seq, request(3500))
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: ingress_entry(take_from)}})
    assert run.verdict == TC_ACT_SHOT and run.stats.get("captured") == 1
    records = captures(ring)
    assert [(r.offset, r.len) for r in records] == [(500, CAPTURE_CHUNK), (500 + CAPTURE_CHUNK, 3500 - 500 - 2048)]
    check_captures(records, frame, seq, take_from)


def test_ack_without_ack_flag_leaves_peer_ack(bpf_env, ring):
    # note_client_ack reads the ack field only when ACK is set.
    take_from = 100_000
    frame = client_frame(take_from, request(10), flags="P", ack=42, window=99)
    entry = ingress_entry(take_from, peer_ack=7, peer_window=8)
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: entry}})
    assert run.verdict == TC_ACT_SHOT
    got = run.maps["arr_ingress"][KEY]
    assert (got.state, got.peer_ack, got.peer_window) == (FLOW_TAKEBACK, 7, 8)
    check_captures(captures(ring), frame, take_from, take_from)


# ------------------------------------------------------------------ (c) larger than a chunk, for real


def test_5000_bytes_arrive_in_three_chunks(bpf_env, ring):
    """A segment of 5000 bytes (a jumbo frame: x0/x1 have MTU 9000) through the
    attached ingress program: records at 0, 2048 and 4096 that reassemble."""
    take_from = MOD - 1000  # the segment crosses the wrap
    data = request(5000)
    frame = Ether(client_frame(take_from, data))
    frame.dst = X0_MAC
    frame = bytes(frame)
    router = bpf_env.objects["router"]

    def body() -> tuple[int, FlowEntry | None, dict[str, int]]:
        ingress = router.maps["arr_ingress"]
        ingress.update(KEY, ingress_entry(take_from))
        before = read_stats(router.stats)
        netlink.bpf_attach(bpf_env.ns, "x0", "ingress", router.prog("arr_router_ingress"), "arr_router_ingress")
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
                s.bind(("x1", 0))
                sent = s.send(frame)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                entry = ingress.lookup(KEY)
                if entry is not None and entry.state == FLOW_TAKEBACK:
                    break
                time.sleep(0.005)
        finally:
            netlink.bpf_detach(bpf_env.ns, "x0", "ingress")
        after = read_stats(router.stats)
        return sent, ingress.lookup(KEY), {k: after[k] - before.get(k, 0) for k in after}

    try:
        sent, entry, stats = bpf_env.call(body)
    finally:
        if bpf_env._capture is not None:
            bpf_env.sent()  # the frame also went out of x1: not another test's to see
    assert sent == len(frame)
    assert entry is not None and entry.state == FLOW_TAKEBACK
    assert stats["captured"] == 1 and stats["capture_lost"] == 0
    records = captures(ring)
    assert [(r.offset, r.len) for r in records] == [(0, 2048), (2048, 2048), (4096, 904)]
    check_captures(records, frame, take_from, take_from)


# ------------------------------------------------------------------ (d) while taken back


@pytest.mark.parametrize("take_from", TAKE_FROMS)
@pytest.mark.parametrize("ahead", [0, 1, 300])
def test_pure_ack_while_taken_back_is_forwarded_pinned(bpf_env, ring, take_from, ahead):
    """The client's ACKs of a response still on its way reach the target, with
    the seq where the target's stream stops (take_from, translated), not the
    client's snd_nxt past the captured request."""
    seq = wrap(take_from + ahead)
    frame = client_frame(seq, flags="A", ack=777, window=55)
    run = bpf_env.run("arr_router_ingress", frame,
                      {"arr_ingress": {KEY: ingress_entry(take_from, FLOW_TAKEBACK)}})
    assert run.verdict == TC_ACT_REDIRECT
    out = Ether(run.out)
    assert out[TCP].seq == wrap(take_from + TO_TARGET.seq_delta)
    pinned = Ether(frame)
    pinned[TCP].seq = take_from
    del pinned[TCP].chksum
    assert run.out == forwarded(bpf_env, bytes(pinned))  # and the rest as always, checksum included
    entry = run.maps["arr_ingress"][KEY]
    assert entry.state == FLOW_TAKEBACK and (entry.peer_ack, entry.peer_window) == (777, 55)
    # The entry's own translation is not changed by the pinning.
    assert entry.x.seq_delta == TO_TARGET.seq_delta
    assert "captured" not in run.stats and ring.consume() == []


def test_captured_counts_each_captured_segment(bpf_env, ring):
    take_from = 100_000
    first = client_frame(take_from, request(100))
    run = bpf_env.run("arr_router_ingress", first, {"arr_ingress": {KEY: ingress_entry(take_from)}})
    assert run.stats.get("captured") == 1
    entry = run.maps["arr_ingress"][KEY]
    ack = client_frame(take_from + 100, flags="A")
    run = bpf_env.run("arr_router_ingress", ack, {"arr_ingress": {KEY: entry}})
    assert run.verdict == TC_ACT_REDIRECT and "captured" not in run.stats
    entry = run.maps["arr_ingress"][KEY]
    second = client_frame(take_from + 100, request(60))
    run = bpf_env.run("arr_router_ingress", second, {"arr_ingress": {KEY: entry}})
    assert run.verdict == TC_ACT_SHOT and run.stats.get("captured") == 1
    # A retransmission of the first: captured again (userspace assembles duplicates).
    run = bpf_env.run("arr_router_ingress", first, {"arr_ingress": {KEY: run.maps["arr_ingress"][KEY]}})
    assert run.verdict == TC_ACT_SHOT and run.stats.get("captured") == 1
    records = captures(ring)
    assert [wrap(Ether(f)[TCP].seq) for f in (first, second, first)] == \
        [int.from_bytes(r.header[4:8], "big") for r in records]
    pieces = [(int.from_bytes(r.header[4:8], "big") + r.offset, r.payload) for r in records]
    assert assemble(take_from, pieces) == request(100) + request(60)


# ------------------------------------------------------------------ (e) FIN and RST while taken back


@pytest.mark.parametrize("ahead", [0, 200])
def test_fin_without_new_payload_is_dropped(bpf_env, ring, ahead):
    take_from = 100_000
    frame = client_frame(take_from + ahead, flags="FA")
    run = bpf_env.run("arr_router_ingress", frame,
                      {"arr_ingress": {KEY: ingress_entry(take_from, FLOW_TAKEBACK)}})
    assert run.verdict == TC_ACT_SHOT
    assert run.stats.get("held") == 1 and "captured" not in run.stats
    entry = run.maps["arr_ingress"][KEY]
    # The rebuilt socket gets the FIN again: nothing about it is recorded yet.
    assert entry.state == FLOW_TAKEBACK and not entry.flags & FLOW_F_FIN
    assert ring.consume() == []


def test_fin_with_new_payload_is_captured(bpf_env, ring):
    take_from = 100_000
    frame = client_frame(take_from, request(40), flags="FPA")
    run = bpf_env.run("arr_router_ingress", frame,
                      {"arr_ingress": {KEY: ingress_entry(take_from, FLOW_TAKEBACK)}})
    assert run.verdict == TC_ACT_SHOT and run.stats.get("captured") == 1
    check_captures(captures(ring), frame, take_from, take_from)


def test_payload_before_take_from_while_taken_back_is_dropped(bpf_env, ring):
    # A retransmission of the routed request while taking back: neither new
    # (nothing to capture) nor a pure ACK (its payload must not reach the target twice).
    take_from = 100_000
    frame = client_frame(take_from - 100, request(100))
    run = bpf_env.run("arr_router_ingress", frame,
                      {"arr_ingress": {KEY: ingress_entry(take_from, FLOW_TAKEBACK)}})
    assert run.verdict == TC_ACT_SHOT and run.stats.get("held") == 1 and ring.consume() == []


def test_rst_while_taken_back_is_forwarded(bpf_env, ring):
    take_from = 100_000
    frame = client_frame(take_from, flags="RA")
    run = bpf_env.run("arr_router_ingress", frame,
                      {"arr_ingress": {KEY: ingress_entry(take_from, FLOW_TAKEBACK)}})
    assert run.verdict == TC_ACT_REDIRECT
    out = Ether(run.out)
    assert (out[IP].src, out[IP].dst, out[TCP].sport, out[TCP].dport) == \
        (TO_TARGET.saddr, TO_TARGET.daddr, TO_TARGET.sport, TO_TARGET.dport)
    assert out[TCP].seq == wrap(take_from + TO_TARGET.seq_delta) and "R" in str(out[TCP].flags)
    entry = run.maps["arr_ingress"][KEY]
    assert entry.flags & FLOW_F_RST  # TakeBacks gives up ("client-reset")
    events = ring.consume()
    assert [(type(e), bytes(e.key), e.kind, e.conn_id) for e in events] == [(Event, bytes(KEY), EV_RST, CONN_ID)]


# ------------------------------------------------------------------ (f) target egress: snd_max


def egress_entry(**fields) -> FlowEntry:
    return FlowEntry(x=Xlate.of(TO_CLIENT), state=FLOW_ACTIVE, conn_id=CONN_ID, **fields)


def server_frame(seq: int, size: int = 0, flags: str = "PA", window: int = 1000) -> bytes:
    pkt = eth() / IP(src=FWD[0][0], dst=FWD[1][0]) / TCP(
        sport=FWD[0][1], dport=FWD[1][1], flags=flags, seq=seq, ack=1, window=window,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (7, 8))]) / (b"r" * size)
    return bytes(pkt)


def run_egress(bpf_env, frame: bytes, entry: FlowEntry) -> FlowEntry:
    run = bpf_env.run("arr_target_egress", frame, {"arr_egress": {FWD_KEY: entry}})
    assert run.verdict == TC_ACT_REDIRECT
    return run.maps["arr_egress"][FWD_KEY]


def response_frame(seq: int, payload: bytes) -> bytes:
    return bytes(eth() / IP(src=FWD[0][0], dst=FWD[1][0]) / TCP(
        sport=FWD[0][1], dport=FWD[1][1], flags="PA", seq=seq, ack=1, window=1000) / payload)


def test_target_keeps_the_start_of_each_response(bpf_env):
    """A segment that begins "HTTP/": its first ARR_HEAD_BYTES for the agent
    (handoff/agent.py ``_response_unfinished``); other segments leave it."""
    nginx = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 1048576\r\n\r\n"
    first = nginx + b"b" * 2000
    run = bpf_env.run("arr_target_egress", response_frame(7000, first), {"arr_egress": {FWD_KEY: egress_entry()}})
    assert run.verdict == TC_ACT_REDIRECT
    head = run.maps["arr_response"][FWD_KEY]
    assert (head.seq, head.len, head.head()) == (7000, HEAD_BYTES, first[:HEAD_BYTES])
    # The body's next segment, and a segment shorter than "HTTP/", leave it.
    kept = {"arr_egress": {FWD_KEY: egress_entry()}, "arr_response": {FWD_KEY: head}}
    for frame in (response_frame(wrap(7000 + len(first)), b"b" * 1000), response_frame(9000, b"HTTP")):
        assert bpf_env.run("arr_target_egress", frame, kept).maps["arr_response"][FWD_KEY].seq == 7000
    # The next response (a short one: all of it kept) replaces it.
    short = b"HTTP/1.1 204 No Content\r\n\r\n"
    head = bpf_env.run("arr_target_egress", response_frame(MOD - 10, short), kept).maps["arr_response"][FWD_KEY]
    assert (head.seq, head.len, head.head()) == (MOD - 10, len(short), short)
    # A connection the agent has no entry for: nothing kept.
    run = bpf_env.run("arr_target_egress", response_frame(7000, first), {})
    assert run.maps["arr_response"] == {}


@pytest.mark.parametrize("start", [7000, MOD - 300])
def test_target_keeps_the_last_bytes_sent_of_a_response(bpf_env, start):
    """Each segment's new bytes go into the response's tail (note_tail), a
    segment shorter than the tail's 8 bytes keeping the ones before it: where
    a chunked body ends (handoff/framing.py). A retransmission adds nothing;
    a segment that overlaps what was sent adds only what lies past it."""
    stream = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"7d0\r\n" + b"c" * 2000 + b"\r\n" + b"3\r\nxyz\r\n" + b"0\r\n\r\n")
    # (from, to) offsets into the stream, in the order the server sends them.
    segments = [(0, 1200), (1200, 2060), (700, 1000), (2060, 2062), (2062, 2070), (2065, 2072),
                (2072, 2073), (2073, len(stream))]
    maps = {"arr_egress": {FWD_KEY: egress_entry()}}
    sent = 0
    for begin, end in segments:
        maps = bpf_env.run("arr_target_egress", response_frame(wrap(start + begin), stream[begin:end]), maps).maps
        sent = max(sent, end)
        h = maps["arr_response"][FWD_KEY]
        assert (h.seq, h.tail_end, h.tail_bytes()) == (start, wrap(start + sent), stream[:sent][-TAIL_BYTES:]), \
            (begin, end)
    assert h.tail_bytes().endswith(b"\r\n0\r\n\r\n")
    # The next response starts its own tail.
    nxt = b"HTTP/1.1 204 No Content\r\n\r\n"
    maps = bpf_env.run("arr_target_egress", response_frame(wrap(start + sent), nxt), maps).maps
    h = maps["arr_response"][FWD_KEY]
    assert (h.seq, h.tail_end, h.tail_bytes()) == (wrap(start + sent), wrap(start + sent + len(nxt)),
                                                   nxt[-TAIL_BYTES:])


@pytest.mark.parametrize("seq", [5000, MOD - 30])
def test_target_tracks_snd_max_and_window(bpf_env, seq):
    entry = run_egress(bpf_env, server_frame(seq, 100, window=0xABCD), egress_entry())
    assert (entry.snd_max, entry.peer_window) == (wrap(seq + 100), 0xABCD)  # the raw field, unscaled
    # A retransmission (lower seq, a window update with it): the window moves, snd_max does not.
    entry = run_egress(bpf_env, server_frame(seq, 50, window=7), entry)
    assert (entry.snd_max, entry.peer_window) == (wrap(seq + 100), 7)
    # A pure ACK at snd_nxt: nothing new sent.
    entry = run_egress(bpf_env, server_frame(wrap(seq + 100), flags="A", window=8), entry)
    assert (entry.snd_max, entry.peer_window) == (wrap(seq + 100), 8)
    # More data, then its FIN (which takes a sequence number).
    entry = run_egress(bpf_env, server_frame(wrap(seq + 100), 10), entry)
    assert entry.snd_max == wrap(seq + 110)
    entry = run_egress(bpf_env, server_frame(wrap(seq + 110), flags="FA"), entry)
    assert entry.snd_max == wrap(seq + 111)


def test_target_snd_max_ending_exactly_at_the_wrap(bpf_env):
    # The server's snd_nxt may be 0 mod 2**32 like any other value; a
    # retransmission after it must not lower snd_max all the same.
    entry = run_egress(bpf_env, server_frame(MOD - 100, 100), egress_entry())
    assert entry.snd_max == 0  # seq + len, wrapped
    entry = run_egress(bpf_env, server_frame(MOD - 100, 50), entry)
    assert entry.snd_max == 0, (
        "BUG handoff/bpf/target.bpf.c note_sent: snd_max 0 doubles as 'nothing sent yet', so after a "
        "segment ending exactly at seq 0 (mod 2**32) a retransmission lowers snd_max to "
        f"{entry.snd_max:#x}; agent.py _take_back_verdict also answers TAKEN_UNACKED for snd_max 0 "
        "whatever the client acknowledged")


def test_target_fin_with_data_counts_one_more(bpf_env):
    entry = run_egress(bpf_env, server_frame(1000, 20, flags="FPA"), egress_entry())
    assert entry.snd_max == 1021


def test_target_rst_does_not_move_snd_max(bpf_env):
    entry = run_egress(bpf_env, server_frame(1000, 20), egress_entry())
    entry = run_egress(bpf_env, server_frame(5000, flags="R", window=3), entry)
    assert (entry.snd_max, entry.peer_window) == (1020, 1000)


def test_capture_record_layout_matches_the_program():
    # The ring buffer tells records apart by size: a Capture must not be an Event's size.
    assert ctypes.sizeof(Capture) != ctypes.sizeof(Event)
    assert Capture.data.size == CAPTURE_CHUNK


# ------------------------------------------------------------------ (g) after a re-handoff in place
# The router rerouted the client's request R = [T, T + 100) in place (handoff/inplace.py): the entry
# is ACTIVE again with take_from after R and R's region kept (struct ack_shift, router side).

T = MOD - 30  # R crosses the wrap


def rerouted_entry(state: int = FLOW_ACTIVE) -> FlowEntry:
    return ingress_entry(wrap(T + 100), state=state, shift=AckShiftState(T, wrap(T + 100), 0, 1))


@pytest.mark.parametrize("state", [FLOW_ACTIVE, FLOW_TAKEBACK])
@pytest.mark.parametrize("offset, size", [(0, 100), (50, 50), (0, 1), (99, 1)])
def test_a_retransmission_of_the_rerouted_request_asks_for_a_resend(bpf_env, ring, state, offset, size):
    frame = client_frame(wrap(T + offset), request(size))
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: rerouted_entry(state)}})
    assert run.verdict == TC_ACT_SHOT  # never forwarded: the server holds R' under other offsets
    assert run.stats == {"rerouted_resent": 1}
    assert [(type(e), bytes(e.key), e.kind, e.conn_id) for e in ring.consume()] == [
        (Event, bytes(KEY), EV_RESEND, CONN_ID)]
    assert run.maps["arr_ingress"][KEY].state == state


@pytest.mark.parametrize("before, size", [(100, 100), (1, 1)])
def test_older_bytes_after_a_reroute_are_dropped_silently(bpf_env, ring, before, size):
    # Before R: acknowledged by the server (the agent shifts only then), offsets no longer valid.
    frame = client_frame(wrap(T - before), request(size))
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: rerouted_entry()}})
    assert (run.verdict, run.stats, ring.consume()) == (TC_ACT_SHOT, {"held": 1}, [])


def test_a_segment_beyond_the_rerouted_request_is_a_new_take_back(bpf_env, ring):
    # R again with the next request behind it: the next request is captured from take_from on.
    frame = client_frame(T, request(300))
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: rerouted_entry()}})
    assert run.verdict == TC_ACT_SHOT and run.maps["arr_ingress"][KEY].state == FLOW_TAKEBACK
    check_captures(captures(ring), frame, T, wrap(T + 100))


@pytest.mark.parametrize("flags", ["A", "FA"])
def test_pure_ack_and_fin_after_the_rerouted_request_are_forwarded(bpf_env, ring, flags):
    frame = client_frame(wrap(T + 100), flags=flags)
    run = bpf_env.run("arr_router_ingress", frame, {"arr_ingress": {KEY: rerouted_entry()}})
    assert (run.verdict, run.out) == (TC_ACT_REDIRECT, forwarded(bpf_env, frame))
    assert ring.consume() == []
