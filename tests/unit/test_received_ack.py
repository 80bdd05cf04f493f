"""The ACK the router sends for a rebuilt client socket's received bytes
(handoff/rebuild.py ``received_ack``): where the socket stands, the window
it has left, its clock; nothing when nothing was received. And the one a
rebuilt forwarding socket owes its server for the last response when it
waits for another client (``parked_acks``, handoff/takeback.py
``_rebuild_forward``): received or not, with a zero window and then with its own."""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from handoff.craft import TCP_ACK
from handoff.rebuild import NO_WSCALE, SocketPlan, owed_ack, parked_acks, received_ack

MOD = 1 << 32
VIP, CLIENT = ("10.0.0.1", 80), ("10.0.0.100", 40000)


def plan_with(**fields) -> SocketPlan:
    values = dict(local=VIP, remote=CLIENT, snd_nxt=5000, rcv_nxt=9000, mss=1448, snd_wscale=7, rcv_wscale=7,
                  sack=True, timestamps=True, ts_clock=123456, snd_wnd=65535, snd_wl1=8999, received=b"x" * 100)
    values.update(fields)
    return SocketPlan(**values)


def header(pkt: bytes) -> dict:
    sport, dport, seq, ack, offset, flags, window = struct.unpack_from("!HHIIBBH", pkt, 20)
    return {"ports": (sport, dport), "seq": seq, "ack": ack, "flags": flags, "window": window,
            "options": pkt[40:20 + (offset >> 4) * 4]}


def test_nothing_received_nothing_to_acknowledge():
    assert received_ack(plan_with(received=b""), rcv_wnd=65536, rcv_wup=9000, tsecr=1) is None


def test_the_ack_a_parked_forwarding_socket_owes_needs_nothing_received():
    # The server's side: everything up to rcv_nxt (its last response) acknowledged.
    plan = plan_with(received=b"", local=("10.0.0.1", 50001), remote=("10.0.0.12", 8080))
    h = header(owed_ack(plan, rcv_wnd=64 * 1024, rcv_wup=9000, tsecr=4242))
    assert h["ports"] == (50001, 8080) and h["flags"] == TCP_ACK
    assert (h["seq"], h["ack"]) == (5000, 9000)
    assert h["window"] == (64 * 1024) >> 7
    assert h["options"] == struct.pack("!BBBBII", 1, 1, 8, 10, 123456, 4242)
    # Parked for the next client: the same ACK announcing no window at all
    # (whatever the socket has left: the server drops the last client's),
    # then the same ACK again, announcing the socket's (it is taken: more
    # than zero).
    zero, reopen = parked_acks(plan, rcv_wnd=64 * 1024, rcv_wup=9000, tsecr=4242)
    assert header(zero) == {**h, "window": 0} and header(reopen) == h
    no_scaling = plan_with(received=b"", snd_wscale=NO_WSCALE, rcv_wscale=0)
    assert [header(a)["window"] for a in parked_acks(no_scaling, rcv_wnd=1 << 20, rcv_wup=9000, tsecr=0)] == \
        [0, 0xFFFF]
    # With bytes received it is received_ack's.
    assert owed_ack(plan_with(), rcv_wnd=65536, rcv_wup=9000, tsecr=1) == received_ack(
        plan_with(), rcv_wnd=65536, rcv_wup=9000, tsecr=1)


def test_the_ack_stands_where_the_socket_does():
    plan = plan_with()
    h = header(received_ack(plan, rcv_wnd=64 * 1024, rcv_wup=9000, tsecr=777))
    assert h["ports"] == (80, 40000) and h["flags"] == TCP_ACK
    assert (h["seq"], h["ack"]) == (5000, 9100)  # its snd_nxt; past the 100 received bytes
    # What is left of the window (the received bytes took 100 of it), in the announced shift.
    assert h["window"] == (64 * 1024 - 100) >> 7
    assert h["options"] == struct.pack("!BBBBII", 1, 1, 8, 10, 123456, 777)


def test_without_window_scaling_the_window_is_bytes_up_to_65535():
    plan = plan_with(snd_wscale=NO_WSCALE, rcv_wscale=0)
    assert header(received_ack(plan, rcv_wnd=1000, rcv_wup=9000, tsecr=0))["window"] == 900
    assert header(received_ack(plan, rcv_wnd=1 << 20, rcv_wup=9000, tsecr=0))["window"] == 0xFFFF


def test_a_window_the_received_bytes_went_past_is_zero():
    # The right edge (rcv_wup + rcv_wnd = 9050) is before the end of what was queued (9100).
    assert header(received_ack(plan_with(), rcv_wnd=50, rcv_wup=9000, tsecr=0))["window"] == 0


def test_without_timestamps_no_options():
    h = header(received_ack(plan_with(timestamps=False), rcv_wnd=65536, rcv_wup=9000, tsecr=5))
    assert h["options"] == b""


def test_across_the_wrap():
    plan = plan_with(rcv_nxt=MOD - 40, received=b"y" * 100, snd_nxt=MOD - 1)
    h = header(received_ack(plan, rcv_wnd=1 << 16, rcv_wup=MOD - 40, tsecr=0))
    assert (h["seq"], h["ack"]) == (MOD - 1, 60)
    assert h["window"] == ((1 << 16) - 100) >> 7


@given(rcv_nxt=st.integers(0, MOD - 1), length=st.integers(1, 1 << 16), rcv_wnd=st.integers(0, 1 << 30),
       shift=st.integers(0, 14), wup_back=st.integers(0, 1 << 16))
def test_the_window_never_reaches_past_the_sockets_right_edge(rcv_nxt, length, rcv_wnd, shift, wup_back):
    plan = plan_with(rcv_nxt=rcv_nxt, received=b"z" * length, rcv_wscale=shift)
    rcv_wup = (rcv_nxt - wup_back) % MOD
    h = header(received_ack(plan, rcv_wnd=rcv_wnd, rcv_wup=rcv_wup, tsecr=0))
    assert h["ack"] == (rcv_nxt + length) % MOD
    right_edge = (rcv_wup + rcv_wnd) % MOD  # as the socket last announced it
    announced = (h["ack"] + (h["window"] << shift)) % MOD
    left = (right_edge - h["ack"]) % MOD
    if left >= 1 << 31:  # the received bytes went past the edge
        assert h["window"] == 0
        return
    # Never past the socket's edge (the client would send bytes it drops), and
    # short of it by less than one unit of the shift, unless the field is full.
    assert (right_edge - announced) % MOD < 1 << shift or h["window"] == 0xFFFF
    assert (right_edge - announced) % MOD <= left
