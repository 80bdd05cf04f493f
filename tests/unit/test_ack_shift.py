"""The ack history of a re-handoff in place (handoff/translate.py ``AckShift``,
``shift_edge``): what the client hears of the server's acks and SACK blocks
while the rewritten request R' stands where the client sent R.

The scenario of every test: the client's request R is [T, T + r) of its
stream; the router sent the rewritten R' to the server at [S, S + r'). Before
R the egress translation was A - (S - T); after it, A - (S + r' - T - r).
The BPF programs run the same function (tests/bpf/test_bpf_properties.py
compares them packet for packet).
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from handoff.translate import MOD, AckShift, seq_after, shift_edge, wrap

u32 = st.integers(0, MOD - 1)
lengths = st.integers(1, 64 * 1024)
near = st.integers(-(1 << 20), 1 << 20)


def scenario(t: int, s: int, r: int, r2: int) -> tuple[AckShift, int]:
    """(the history, the new delta) of R = [T, T+r) rerouted as R' = [S, S+r2)."""
    prev = wrap(s - t)
    return AckShift(start=s, end=wrap(s + r2), prev_delta=prev), wrap(s + r2 - t - r)


def rel(value: int, base: int) -> int:
    """VALUE as a signed distance from BASE in sequence space."""
    d = wrap(value - base)
    return d - MOD if d >= 1 << 31 else d


@given(edge=u32, delta=u32, left=st.booleans())
def test_without_history_an_edge_takes_the_delta(edge, delta, left):
    assert shift_edge(edge, delta, None, left=left) == wrap(edge - delta)


def test_the_three_regions_by_example():
    # R: client bytes [1000, 1100); R': server bytes [50_000, 50_150).
    shift, delta = scenario(t=1000, s=50_000, r=100, r2=150)
    assert shift_edge(49_990, delta, shift) == 990          # before R': the old translation
    assert shift_edge(50_000, delta, shift) == 1000         # R' not started: R not acknowledged
    assert shift_edge(50_075, delta, shift) == 1000         # half of R': still none of R
    assert shift_edge(50_075, delta, shift, left=True) == 1100  # a block from there claims no byte of R
    assert shift_edge(50_150, delta, shift) == 1100         # all of R': all of R
    assert shift_edge(50_160, delta, shift) == 1110         # beyond: the new translation


@given(t=u32, s=u32, r=lengths, r2=lengths, offset=near)
def test_cumulative_ack_is_exact_outside_and_rounds_down_inside(t, s, r, r2, offset):
    shift, delta = scenario(t, s, r, r2)
    ack = wrap(s + offset)
    out = shift_edge(ack, delta, shift)
    if offset <= 0:
        assert out == wrap(t + offset)  # the previous requests, as before
    elif offset >= r2:
        assert out == wrap(t + r + offset - r2)  # the next ones, with the new delta
    else:
        assert out == t  # R is acknowledged only once all of R' is


@given(t=u32, s=u32, r=lengths, r2=lengths, a=near, b=near)
def test_cumulative_ack_never_moves_backwards(t, s, r, r2, a, b):
    shift, delta = scenario(t, s, r, r2)
    low, high = sorted((a, b))
    assert rel(shift_edge(wrap(s + low), delta, shift), t) <= rel(shift_edge(wrap(s + high), delta, shift), t)


@given(t=u32, s=u32, r=lengths, r2=lengths, a=near, size=st.integers(1, 1 << 20))
def test_a_sack_block_claims_bytes_of_r_only_when_the_server_has_all_of_r_prime(t, s, r, r2, a, size):
    shift, delta = scenario(t, s, r, r2)
    left, right = wrap(s + a), wrap(s + a + size)
    out_left = rel(shift_edge(left, delta, shift, left=True), t)
    out_right = rel(shift_edge(right, delta, shift), t)
    overlaps_r = out_left < out_right and out_left < r and out_right > 0
    if overlaps_r:
        assert a <= 0 and a + size >= r2
    # A block the server really has, outside R', keeps its length.
    if a + size <= 0 or a >= r2:
        assert out_right - out_left == size


@given(t=u32, s=u32, r=lengths, r2=lengths, a=near, size=st.integers(1, 1 << 20))
def test_a_translated_block_is_never_wider_than_what_the_server_has(t, s, r, r2, a, size):
    """The client may never take for received a byte the server does not
    hold: every client byte a translated block covers maps to a server byte
    the original block covers (R's bytes to all of R')."""
    shift, delta = scenario(t, s, r, r2)
    out_left = rel(shift_edge(wrap(s + a), delta, shift, left=True), t)
    out_right = rel(shift_edge(wrap(s + a + size), delta, shift), t)
    for c in {out_left, out_right - 1, 0, r - 1, r}:  # the block's ends and R's
        if not out_left <= c < out_right:
            continue
        if c < 0:
            assert a <= c < a + size  # an earlier byte: the old offset
        elif c < r:
            assert a <= 0 and a + size >= r2
        else:
            assert a <= c - r + r2 < a + size  # a later byte: the new offset


@settings(max_examples=200)
@given(start=u32, length=st.integers(1, (1 << 30)), edge=u32)
def test_seq_after_is_serial_arithmetic(start, length, edge):
    assert seq_after(wrap(start + length), start)
    assert not seq_after(start, wrap(start + length))
    assert not seq_after(edge, edge)
