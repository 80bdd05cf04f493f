"""Taking a connection back, the pure part (handoff/takeback.py, handoff/rebuild.py):
reassembling the captured request, parsing the captured header, and the two
socket plans the router rebuilds from the map entries and the agent's answer."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.control import TAKEN_OK, Taken
from handoff.maps import (FLOW_TAKEBACK, WATCH_OPT_SACK, WATCH_OPT_TS, WATCH_OPT_WSCALE, FlowEntry, FlowKey,
                          WatchEntry, Xlate)
from handoff.rebuild import NO_WSCALE, SocketPlan, ms_clock, repair_options
from handoff.takeback import (DEFAULT_MSS, REBUILT_FORWARD_RTO_MAX_MS, RTT_PROBE_BYTE, TS_STEP, Segment, Taking,
                              assemble, client_seen_tsval, plan_client, plan_forward, plan_hand_on, profile_of)
from handoff.translate import HandoffInputs, SocketState, Translation, compute_translations

MOD = 1 << 32


def wrap(value: int) -> int:
    return value % MOD


def ahead(a: int, b: int) -> bool:
    """a is after b in sequence space (RFC 1982): what PAWS compares."""
    return 0 < wrap(a - b) < 1 << 31


# ------------------------------------------------------------------ assemble


def test_assemble_contiguous_from_start():
    assert assemble(1000, [(1000, b"GET "), (1004, b"/ HTTP/1.1\r\n")]) == b"GET / HTTP/1.1\r\n"


def test_assemble_nothing_is_empty():
    assert assemble(1000, []) == b""


def test_assemble_pieces_in_any_order():
    pieces = [(1008, b"89"), (1000, b"0123"), (1004, b"4567")]
    assert assemble(1000, pieces) == b"0123456789"
    assert assemble(1000, pieces[::-1]) == b"0123456789"


def test_assemble_overlaps_and_duplicates():
    # Retransmissions may repeat a segment or re-cut the stream differently
    # (a smaller MSS, coalesced segments): every copy carries the same bytes.
    pieces = [(1000, b"0123"), (1000, b"0123"), (1002, b"2345"), (1001, b"1"), (1003, b"3456789"),
              (1005, b"56")]
    assert assemble(1000, pieces) == b"0123456789"


def test_assemble_piece_inside_what_is_already_there_adds_nothing():
    assert assemble(1000, [(1000, b"0123456789"), (1003, b"34")]) == b"0123456789"


def test_assemble_stops_at_a_hole():
    # 1004..1006 missing: what lies beyond it the client sends again.
    assert assemble(1000, [(1000, b"0123"), (1006, b"6789")]) == b"0123"
    assert assemble(1000, [(1001, b"123")]) == b""


def test_assemble_trims_a_piece_that_starts_before_start():
    # A retransmission straddling take_from: its head was routed already.
    assert assemble(1000, [(990, b"xxxxxxxxxx0123")]) == b"0123"
    assert assemble(1000, [(990, b"xxxxxxxxxx0123"), (1000, b"01")]) == b"0123"
    assert assemble(1000, [(1000, b"012345"), (990, b"xxxxxxxxxx0123")]) == b"012345"


def test_assemble_drops_a_piece_entirely_before_start():
    assert assemble(1000, [(990, b"xxxxx"), (1000, b"01")]) == b"01"
    assert assemble(1000, [(990, b"xxxxxxxxxx")]) == b""  # ends exactly at start


def test_assemble_straddling_piece_bridges_to_later_pieces():
    # The straddling retransmission is the only one that covers 1000..1004;
    # the piece at 1004 continues it. (Sorting by the wrapped offset puts a
    # piece before START last, after the piece it should lead to.)
    got = (assemble(1000, [(1004, b"456789"), (995, b"xxxxx0123")]),
           assemble(1000, [(990, b"xxxxxxxxxx0123"), (1000, b"01"), (1004, b"45")]))
    assert got == (b"0123456789", b"012345"), (
        "BUG handoff/takeback.py assemble: a piece starting before START is sorted last "
        "(its wrapped offset is >= 2**31), so the loop breaks at the first later piece "
        f"before the straddling piece can fill the start: got {got!r}")


def test_assemble_across_the_wrap():
    start = MOD - 4
    pieces = [(wrap(start + 6), b"6789"), (start, b"0123"), (wrap(start + 4), b"45")]
    assert assemble(start, pieces) == b"0123456789"
    # A piece before a start just past the wrap: the trimming works mod 2**32 too.
    assert assemble(2, [(MOD - 3, b"xxxxx01234")]) == b"01234"
    assert assemble(MOD - 1, [(MOD - 3, b"xx0123")]) == b"0123"


def coverage_prefix(length: int, spans: list[tuple[int, int]]) -> int:
    """The reference: how many bytes from 0 some span covers without a gap."""
    covered = bytearray(length)
    for at, end in spans:
        covered[at:end] = b"\x01" * (end - at)
    return covered.index(0) if 0 in covered else length


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=300), start=st.one_of(st.integers(MOD - 300, MOD - 1),
                                                                 st.integers(0, MOD - 1)),
       cuts=st.lists(st.tuples(st.integers(0, 299), st.integers(1, 120)), min_size=1, max_size=12),
       seed=st.randoms(use_true_random=False), drop=st.integers(0, 50))
def test_assemble_any_overlapping_cut_in_any_order(data, start, cuts, seed, drop):
    # Pieces covering the whole string for sure (a tiling), plus random
    # overlapping ones; shuffled.
    spans = []
    at = 0
    for _, size in cuts:
        end = min(len(data), at + size)
        spans.append((at, end))
        at = end
        if at == len(data):
            break
    if at < len(data):
        spans.append((at, len(data)))
    spans += [(min(o, len(data) - 1), min(len(data), min(o, len(data) - 1) + s)) for o, s in cuts]
    seed.shuffle(spans)
    pieces = [(wrap(start + a), data[a:e]) for a, e in spans]
    assert assemble(start, pieces) == data
    # One piece lost: the prefix up to the first byte nothing else covers.
    lost = drop % len(spans)
    rest = spans[:lost] + spans[lost + 1:]
    prefix = coverage_prefix(len(data), rest)
    assert assemble(start, [(wrap(start + a), data[a:e]) for a, e in rest]) == data[:prefix]


# ------------------------------------------------------------------ Segment.parse


def tcp_header(seq: int, ack: int, window: int, options: bytes = b"", flags: int = 0x18) -> bytes:
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 40000, 80, seq, ack, doff << 4, flags, window, 0xBEEF, 0) + options


def test_segment_parse_with_timestamps():
    options = b"\x01\x01" + struct.pack("!BBII", 8, 10, 0xDEADBEEF, 7)
    segment = Segment.parse(tcp_header(0xFFFFFFF0, 123456, 501, options))
    assert segment == Segment(seq=0xFFFFFFF0, ack=123456, window=501, tsval=0xDEADBEEF, tsecr=7)


def test_segment_parse_with_sack_and_timestamps():
    options = (b"\x01\x01" + struct.pack("!BBII", 8, 10, 5, 6)
               + b"\x01\x01" + struct.pack("!BBII", 5, 10, 100, 200))
    assert Segment.parse(tcp_header(1, 2, 3, options)) == Segment(1, 2, 3, 5, 6)


def test_segment_parse_without_options():
    segment = Segment.parse(tcp_header(42, 43, 0xFFFF))
    assert segment == Segment(seq=42, ack=43, window=0xFFFF, tsval=None, tsecr=None)


def test_segment_parse_refuses_a_bad_option():
    # TakeBacks.on_captures skips such a capture (the client sends it again).
    with pytest.raises(ValueError):
        Segment.parse(tcp_header(1, 2, 3, struct.pack("!BBI", 8, 6, 0)))


# ------------------------------------------------------------------ plans

CLIENT = ("10.0.0.2", 40000)
VIP = ("192.168.1.7", 80)
ROUTER_FWD = ("192.168.1.7", 51234)  # the router's end of the forwarding connection
TARGET = ("10.0.0.9", 8080)
TO_TARGET = Translation(saddr=ROUTER_FWD[0], daddr=TARGET[0], sport=ROUTER_FWD[1], dport=TARGET[1],
                        seq_delta=MOD - 1000, ack_delta=MOD - 77, tsval_delta=1 << 20,
                        tsecr_delta=MOD - 5, wscale_in=7, wscale_out=9)


def make_entry(**fields) -> FlowEntry:
    values = dict(x=Xlate.of(TO_TARGET), state=FLOW_TAKEBACK, conn_id=9, take_from=MOD - 10,
                  peer_ack=500, peer_window=1000, client_mss=1400, router_wscale=6,
                  client_opts=WATCH_OPT_SACK | WATCH_OPT_TS, syn_seq=1234, requests=1)
    values.update(fields)
    return FlowEntry(**values)


_SYNACK = object()
"""make_taking's default watch: a SYN-ACK that negotiated everything."""


def make_taking(entry: FlowEntry | None = None, *, latest: Segment | None = None,
                watch: object = _SYNACK, taken: Taken | None = None,
                received: bytes = b"GET /next HTTP/1.1\r\n\r\n", elapsed_ms: int = 25) -> Taking:
    if watch is _SYNACK:
        watch = WatchEntry(synack_mss=1360, synack_wscale=8,
                           synack_opts=WATCH_OPT_SACK | WATCH_OPT_TS | WATCH_OPT_WSCALE)
    return Taking(client_key=FlowKey.of(CLIENT, VIP), entry=entry or make_entry(),
                  latest=latest or Segment(seq=MOD - 10, ack=500, window=900, tsval=MOD - 3, tsecr=4000),
                  received=received, taken=taken or Taken(9, TAKEN_OK, snd_nxt=10, window=29200, syn_seq=77),
                  watch=watch, elapsed_ms=elapsed_ms)


def test_client_plan_stands_where_the_client_sees_the_router():
    t = make_taking()
    plan = plan_client(t)
    assert plan.local == VIP and plan.remote == CLIENT
    # Everything the server sent, in the client's sequence space.
    assert plan.snd_nxt == wrap(t.taken.snd_nxt + TO_TARGET.ack_delta) == MOD - 67
    assert plan.rcv_nxt == t.entry.take_from
    assert plan.received == t.received
    assert plan.rcv_end == wrap(t.entry.take_from + len(t.received))
    assert plan.mss == 1400
    assert (plan.snd_wscale, plan.rcv_wscale) == (TO_TARGET.wscale_in, 6)
    assert plan.sack and plan.timestamps
    assert plan.ts_clock == ms_clock(4000 + 25 + TS_STEP) == 5048  # even: a millisecond clock
    assert ahead(plan.ts_clock, t.latest.tsecr)  # PAWS at the client: never older than what it saw
    assert plan.snd_wnd == 1000 << TO_TARGET.wscale_in  # the entry's newest window, scaled
    assert plan.snd_wl1 == t.latest.seq


def test_client_plan_for_an_rtt_probe_stands_one_byte_short():
    """RTT_PROBE_BYTE: the socket sends the response's last byte again, so
    it is rebuilt one before it, across the wrap too; the rest is the same."""
    for taken in (Taken(9, TAKEN_OK, snd_nxt=10, window=29200, syn_seq=77),
                  Taken(9, TAKEN_OK, snd_nxt=wrap(-TO_TARGET.ack_delta), window=29200, syn_seq=77)):
        t = make_taking(taken=taken)
        plain, probing = plan_client(t), plan_client(t, rtt_probe=True)
        assert probing.snd_nxt == wrap(plain.snd_nxt - len(RTT_PROBE_BYTE))
        assert probing == replace(plain, snd_nxt=probing.snd_nxt)
    assert plan_client(make_taking(taken=Taken(9, TAKEN_OK, snd_nxt=wrap(-TO_TARGET.ack_delta), window=1,
                                                syn_seq=77)), rtt_probe=True).snd_nxt == MOD - 1


def test_client_plan_without_options():
    t = make_taking(make_entry(client_opts=0, client_mss=0, peer_window=0))
    plan = plan_client(t)
    assert not plan.sack and not plan.timestamps
    assert plan.mss == DEFAULT_MSS
    assert plan.snd_wnd == t.latest.window << TO_TARGET.wscale_in  # no window in the entry: the segment's


def test_client_plan_timestamps_need_a_tsecr():
    # Negotiated, but the captured segment carries none: the socket cannot
    # know the client's clock, so it does not send timestamps.
    t = make_taking(latest=Segment(seq=5, ack=6, window=7, tsval=None, tsecr=None))
    assert not plan_client(t).timestamps


def test_client_plan_clock_ahead_across_the_wrap():
    t = make_taking(latest=Segment(seq=5, ack=6, window=7, tsval=1, tsecr=MOD - 100), elapsed_ms=0)
    plan = plan_client(t)
    assert plan.ts_clock == ms_clock(MOD - 100 + TS_STEP) and ahead(plan.ts_clock, MOD - 100)


def lagging_echo(target_tsval: int, tsecr: int, margin: int = 1 << 20) -> Taking:
    """A take-back whose watch entry recorded TARGET_TSVAL at the handoff,
    whose translation raised the target's TSvals by MARGIN, and whose client
    echoes TSECR."""
    x = Translation(saddr=ROUTER_FWD[0], daddr=TARGET[0], sport=ROUTER_FWD[1], dport=TARGET[1],
                    seq_delta=0, ack_delta=0, tsval_delta=0, tsecr_delta=margin, wscale_in=7, wscale_out=7)
    return make_taking(make_entry(x=Xlate.of(x)),
                       latest=Segment(seq=MOD - 10, ack=500, window=900, tsval=1, tsecr=tsecr),
                       watch=WatchEntry(target_tsval=target_tsval, synack_opts=WATCH_OPT_TS), elapsed_ms=25)


def test_client_clock_follows_the_handoffs_first_tsval_when_the_echo_lags():
    # The server answered before acknowledging the whole request: the client
    # took no TS.Recent from the answer and still echoes the router's clock
    # from before the handoff (5000), behind what the answer showed it.
    t = lagging_echo(target_tsval=1000, tsecr=5000)
    shown = 1000 + (1 << 20)
    assert client_seen_tsval(t) == shown
    plan = plan_client(t)
    assert plan.ts_clock == ms_clock(shown + 25 + TS_STEP) and ahead(plan.ts_clock, shown)


def test_client_clock_keeps_an_echo_newer_than_the_handoffs_first_tsval():
    t = lagging_echo(target_tsval=1000, tsecr=(1 << 20) + 90_000)
    assert client_seen_tsval(t) == (1 << 20) + 90_000
    assert plan_client(t).ts_clock == ms_clock((1 << 20) + 90_000 + 25 + TS_STEP)


def test_client_clock_without_a_recorded_target_tsval_is_the_echo():
    assert client_seen_tsval(lagging_echo(target_tsval=0, tsecr=7)) == 7
    assert client_seen_tsval(make_taking(watch=None)) == 4000


@given(target_tsval=st.integers(1, MOD - 1), margin=st.integers(0, MOD - 1), tsecr=st.integers(0, MOD - 1))
def test_client_clock_is_ahead_of_the_newer_of_echo_and_first_tsval(target_tsval, margin, tsecr):
    t = lagging_echo(target_tsval, tsecr, margin)
    shown = wrap(target_tsval + margin)
    clock = plan_client(t).ts_clock
    newest = client_seen_tsval(t)
    assert newest in (shown, tsecr) and ahead(clock, newest) and clock % 2 == 0
    assert not ahead(shown if newest == tsecr else tsecr, newest)  # it is the newer one


def test_forward_plan_stands_where_the_server_sees_the_router():
    t = make_taking()
    plan = plan_forward(t)
    assert plan.local == ROUTER_FWD and plan.remote == TARGET
    # The server's receive stream stops where the captured request begins.
    assert plan.snd_nxt == wrap(t.entry.take_from + TO_TARGET.seq_delta) == MOD - 1010
    assert plan.rcv_nxt == t.taken.snd_nxt
    assert plan.received == b""
    assert plan.mss == 1360
    assert (plan.snd_wscale, plan.rcv_wscale) == (8, TO_TARGET.wscale_out)
    assert plan.sack and plan.timestamps
    # The newest TSval the server saw is the client's, translated.
    server_saw = wrap(t.latest.tsval + TO_TARGET.tsval_delta)
    assert plan.ts_clock == ms_clock(server_saw + 25 + TS_STEP) and ahead(plan.ts_clock, server_saw)
    assert plan.snd_wnd == t.taken.window
    assert plan.snd_wl1 == t.taken.snd_nxt


def test_forward_plan_bounds_the_rebuilt_connections_rto():
    """A rebuilt socket has no RTT sample: its RTO would start at 3 s."""
    plan = plan_forward(make_taking(), 20_000)
    assert (plan.rto_min_us, plan.rto_max_ms) == (20_000, REBUILT_FORWARD_RTO_MAX_MS) == (20_000, 1_000)
    assert plan_forward(make_taking()).rto_min_us == 0  # the kernel's floor
    # The client's side stays the kernel's: clients are not on the cluster's network.
    client = plan_client(make_taking())
    assert (client.rto_min_us, client.rto_max_ms) == (0, 0)


def test_forward_plan_follows_the_synack_options():
    t = make_taking(watch=WatchEntry(synack_mss=0, synack_wscale=8, synack_opts=WATCH_OPT_TS))
    plan = plan_forward(t)
    # The SYN-ACK had no window scale: whatever synack_wscale holds, no shift.
    assert plan.snd_wscale == NO_WSCALE
    assert not plan.sack and plan.timestamps and plan.mss == DEFAULT_MSS


def test_forward_plan_without_a_watch_entry_or_timestamps():
    t = make_taking(watch=None, taken=Taken(9, TAKEN_OK, snd_nxt=MOD - 1, window=0))
    plan = plan_forward(t)
    assert (plan.snd_wscale, plan.sack, plan.timestamps, plan.mss) == (NO_WSCALE, False, False, DEFAULT_MSS)
    assert plan.snd_wnd == 65535 and plan.rcv_nxt == MOD - 1
    # Negotiated with the server, but the client's segment has no TSval to translate.
    t = make_taking(latest=Segment(seq=5, ack=6, window=7, tsval=None, tsecr=None))
    assert not plan_forward(t).timestamps


@settings(max_examples=200, deadline=None)
@given(seq_delta=st.integers(0, MOD - 1), ack_delta=st.integers(0, MOD - 1), tsval_delta=st.integers(0, MOD - 1),
       take_from=st.integers(1, MOD - 1), snd_nxt=st.integers(0, MOD - 1), tsval=st.integers(0, MOD - 1),
       tsecr=st.integers(0, MOD - 1), elapsed=st.integers(0, 60_000))
def test_plan_invariants_mod_2_32(seq_delta, ack_delta, tsval_delta, take_from, snd_nxt, tsval, tsecr, elapsed):
    x = Translation(saddr=ROUTER_FWD[0], daddr=TARGET[0], sport=ROUTER_FWD[1], dport=TARGET[1],
                    seq_delta=seq_delta, ack_delta=ack_delta, tsval_delta=tsval_delta, tsecr_delta=0,
                    wscale_in=2, wscale_out=3)
    t = make_taking(make_entry(x=Xlate.of(x), take_from=take_from),
                    latest=Segment(seq=take_from, ack=1, window=1, tsval=tsval, tsecr=tsecr),
                    taken=Taken(1, TAKEN_OK, snd_nxt=snd_nxt, window=100), elapsed_ms=elapsed)
    client, forward = plan_client(t), plan_forward(t)
    assert client.snd_nxt == wrap(snd_nxt + ack_delta) and client.rcv_nxt == take_from
    assert forward.snd_nxt == wrap(take_from + seq_delta) and forward.rcv_nxt == snd_nxt
    # The two rebuilt sockets agree with the translation that stays in force
    # for the other direction: the client's next byte, translated, is the
    # server's next byte; the server's next byte, translated back, the client's.
    assert wrap(client.rcv_nxt + seq_delta) == forward.snd_nxt
    assert wrap(forward.rcv_nxt + ack_delta) == client.snd_nxt
    assert ahead(client.ts_clock, tsecr) and ahead(forward.ts_clock, wrap(tsval + tsval_delta))
    for plan in (client, forward):
        assert all(0 <= v < MOD for v in (plan.snd_nxt, plan.rcv_nxt, plan.ts_clock))
        assert plan.ts_clock % 2 == 0  # TCP_TIMESTAMP's lowest bit would ask for microseconds


# ------------------------------------------------------------------ hand-on


def test_hand_on_is_the_client_plan_with_the_request_consumed():
    t = make_taking(received=b"GET /a HTTP/1.1\r\n\r\nGET /b")  # the next request's start captured too
    on = plan_hand_on(t, request_len=len(b"GET /a HTTP/1.1\r\n\r\n"))
    plan = plan_client(t)
    c = on.client
    assert (c.local, c.remote) == (VIP, CLIENT) and on.client_key == t.client_key
    assert c.snd_nxt == plan.snd_nxt  # all the old server sent: the client acknowledged it
    # Past the routed request only: the client sends what follows it again
    # (nothing acknowledged it), and it is taken back then.
    assert c.rcv_nxt == wrap(t.entry.take_from + 19) != plan.rcv_end
    assert on.request_from == t.entry.take_from
    assert (c.snd_wscale, c.rcv_wscale, c.mss, c.sack, c.timestamps) == (
        plan.snd_wscale, plan.rcv_wscale, plan.mss, plan.sack, plan.timestamps)
    assert c.ts_clock == plan.ts_clock and ahead(c.ts_clock, t.latest.tsecr)
    assert not c.ts_usec
    assert on.client_tsval == t.latest.tsval and on.client_syn_seq == t.entry.syn_seq == 1234
    assert on.profile == profile_of(t.entry) and on.profile.mss == 1400 and on.profile.sack
    assert on.requests == t.entry.requests


def test_hand_on_without_a_captured_tsval():
    t = make_taking(make_entry(client_opts=WATCH_OPT_SACK),
                    latest=Segment(seq=5, ack=6, window=7, tsval=None, tsecr=None))
    on = plan_hand_on(t, 3)
    assert on.client_tsval == 0 and not on.client.timestamps and not on.profile.timestamps


@settings(max_examples=200, deadline=None)
@given(seq_delta=st.integers(0, MOD - 1), ack_delta=st.integers(0, MOD - 1), take_from=st.integers(1, MOD - 1),
       snd_nxt=st.integers(0, MOD - 1), f_snd=st.integers(0, MOD - 1), f_rcv=st.integers(0, MOD - 1),
       request_len=st.integers(1, 9000), rewritten_extra=st.integers(-20, 200))
def test_hand_on_translations_join_both_streams(seq_delta, ack_delta, take_from, snd_nxt, f_snd, f_rcv,
                                                request_len, rewritten_extra):
    """The new handoff's translations from a hand-on: the client's first byte
    after its request is the new server's first after the rewritten one; the
    new server's first byte reaches the client right after the last byte of
    the old server's it acknowledged. Nothing in between is lost or doubled."""
    x = Translation(saddr=ROUTER_FWD[0], daddr=TARGET[0], sport=ROUTER_FWD[1], dport=TARGET[1],
                    seq_delta=seq_delta, ack_delta=ack_delta, tsval_delta=0, tsecr_delta=0,
                    wscale_in=2, wscale_out=3)
    t = make_taking(make_entry(x=Xlate.of(x), take_from=take_from),
                    taken=Taken(1, TAKEN_OK, snd_nxt=snd_nxt, window=100), received=b"r" * request_len)
    on = plan_hand_on(t, request_len)
    rewritten_len = max(1, request_len + rewritten_extra)
    forward = SocketState(local=("10.0.0.1", 50001), remote=("10.0.0.8", 8080), snd_nxt=f_snd, rcv_nxt=f_rcv,
                          snd_wscale=7, rcv_wscale=7, ts_clock=1, timestamps=True, sack=True, mss=1460)
    to_target, to_client = compute_translations(HandoffInputs(
        client=on.client, forward=forward, request_len=rewritten_len,
        client_syn_tsval=on.client_tsval, target_tsval=0))
    assert wrap(take_from + request_len + to_target.seq_delta) == wrap(f_snd + rewritten_len)
    assert wrap(f_rcv + to_client.seq_delta) == wrap(snd_nxt + ack_delta)
    assert to_client.ack_delta == to_target.seq_delta and to_target.ack_delta == to_client.seq_delta


# ------------------------------------------------------------------ repair_options


def plan_with(**fields) -> SocketPlan:
    values = dict(local=VIP, remote=CLIENT, snd_nxt=1, rcv_nxt=2, mss=1400, snd_wscale=7, rcv_wscale=9,
                  sack=True, timestamps=True, ts_clock=3, snd_wnd=4, snd_wl1=5)
    values.update(fields)
    return SocketPlan(**values)


def test_repair_options_all_negotiated():
    # struct tcp_repair_opt {u32 opt_code; u32 opt_val} in host order; the
    # window option's value is snd_wscale | rcv_wscale << 16.
    assert repair_options(plan_with()) == struct.pack("=IIIIIIII", 2, 1400, 3, 7 | 9 << 16, 4, 0, 8, 0)


def test_repair_options_without_wscale():
    assert repair_options(plan_with(snd_wscale=NO_WSCALE)) == struct.pack("=IIIIII", 2, 1400, 4, 0, 8, 0)


def test_repair_options_shift_zero_is_still_a_window_option():
    # 0 is a negotiated shift (scaling on, factor 1); only NO_WSCALE means none.
    assert repair_options(plan_with(snd_wscale=0, rcv_wscale=0, sack=False, timestamps=False)) == \
        struct.pack("=IIII", 2, 1400, 3, 0)


@pytest.mark.parametrize("sack, timestamps, codes", [
    (False, False, [2, 3]), (True, False, [2, 3, 4]), (False, True, [2, 3, 8]), (True, True, [2, 3, 4, 8])])
def test_repair_options_sack_and_timestamps(sack, timestamps, codes):
    raw = repair_options(plan_with(sack=sack, timestamps=timestamps))
    assert [code for code, _ in struct.iter_unpack("=II", raw)] == codes


def test_repair_options_of_the_two_plans():
    t = make_taking()
    assert [c for c, _ in struct.iter_unpack("=II", repair_options(plan_client(t)))] == [2, 3, 4, 8]
    t = make_taking(watch=None)
    assert list(struct.iter_unpack("=II", repair_options(plan_forward(t)))) == [(2, DEFAULT_MSS)]


def test_rcv_end_wraps():
    assert plan_with(rcv_nxt=MOD - 2, received=b"abcd").rcv_end == 2

