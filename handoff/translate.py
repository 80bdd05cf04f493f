"""The translation of a handed-off connection: the reference model.

This is the specification the BPF programs implement (blueprint section 3):
pure integer arithmetic on the TCP/IP fields, no I/O. ``compute_translations``
turns what the router read from its two sockets into one ``Translation`` per
direction; ``translate_fields`` applies one to a packet's fields.

All sequence and timestamp arithmetic is modulo 2**32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MOD = 1 << 32
TS_MARGIN = 1 << 20
"""M of the blueprint, in ticks of a millisecond clock: added so translated
TSvals are never older than what the peer already saw from the router,
including the request retransmissions the router may still send on the
forwarding connection (about 17 minutes). A connection whose clock counts
microseconds (``tcp_usec_ts`` routes, Linux 6.7+) gets the same time span in its
own ticks: see ``margin_ticks``."""
USEC_PER_MSEC = 1000


def wrap(value: int) -> int:
    return value % MOD


@dataclass(frozen=True, slots=True)
class Translation:
    """How one direction's packets are rewritten. Matching is by the map key."""

    saddr: str
    daddr: str
    sport: int
    dport: int
    seq_delta: int
    """Added to seq."""
    ack_delta: int
    """Subtracted from ack and from every SACK edge."""
    tsval_delta: int
    """Added to TSval."""
    tsecr_delta: int
    """Subtracted from TSecr."""
    wscale_in: int
    """Shift of the window field as it arrives (the sender's shift)."""
    wscale_out: int
    """Shift the receiver applies (what the router announced to it)."""
    tsecr_floor: int = 0
    """The lowest TSecr (as it arrives) that echoes a TSval of the receiver's:
    the receiver's TSvals reach the sender translated, so every genuine echo
    is at or after this. An earlier one echoes a TSval of the router's own
    socket (the sender's peer before the handoff, or the router's rebuilt
    socket before a re-handoff): translated, it would look to the receiver
    like its own TSval from long ago (an RTT sample of minutes on a
    retransmission it acknowledges, which sets its RTO to the maximum). It
    leaves as 0, which Linux takes for "no echo". 0: no floor."""


def echo_is_genuine(tsecr: int, floor: int) -> bool:
    """Whether an arriving TSecr is one to translate (``Translation.tsecr_floor``)."""
    return not floor or (tsecr != 0 and (tsecr - floor) % MOD < 1 << 31)


@dataclass(frozen=True, slots=True)
class SocketState:
    """What the router read from one of its sockets (TCP_REPAIR, TCP_INFO, ...)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    snd_nxt: int
    """Next sequence number the router sends (TCP_QUEUE_SEQ on the send queue)."""
    rcv_nxt: int
    """Next sequence number the router expects (TCP_QUEUE_SEQ on the receive queue)."""
    snd_wscale: int
    """The peer's window shift (it scales the windows it sends by this)."""
    rcv_wscale: int
    """The router's announced shift (the peer scales by this what it receives)."""
    ts_clock: int
    """The socket's timestamp clock now (TCP_TIMESTAMP)."""
    timestamps: bool
    sack: bool
    mss: int
    ts_usec: bool = False
    """The connection's TSvals count microseconds, not milliseconds."""


def margin_ticks(margin: int, usec: bool) -> int:
    """MARGIN (millisecond ticks) in the ticks of a connection's own clock."""
    return margin * USEC_PER_MSEC if usec else margin


@dataclass(frozen=True, slots=True)
class HandoffInputs:
    client: SocketState
    """The accepted client connection (local = v_ip:v_port)."""
    forward: SocketState
    """The forwarding connection to the target, before the request is sent on it."""
    request_len: int
    """R': bytes the router sends on the forwarding connection (the request, rewritten)."""
    client_syn_tsval: int
    """The client's TSval in its SYN (TCP_SAVED_SYN)."""
    target_tsval: int
    """The latest target TSval the router's watch entry recorded."""


def compute_translations(inputs: HandoffInputs, margin: int = TS_MARGIN
                         ) -> tuple[Translation, Translation]:
    """(client -> target at router ingress, target -> client at target egress)."""
    c, f = inputs.client, inputs.forward
    d_in = wrap(f.snd_nxt + inputs.request_len - c.rcv_nxt)
    d_out = wrap(c.snd_nxt - f.rcv_nxt)
    if c.timestamps:
        # Each delta raises the values one peer sees above the clock of the
        # connection the router had with it: the margin in that clock's ticks.
        ts_out = wrap(c.ts_clock + margin_ticks(margin, c.ts_usec) - inputs.target_tsval)
        ts_in = wrap(f.ts_clock + margin_ticks(margin, f.ts_usec) - inputs.client_syn_tsval)
    else:
        ts_out = ts_in = 0
    # Genuine echoes: of the target's TSvals (from the one recorded on), as
    # the client got them; of the client's (from its SYN's, or the newest a
    # take-back saw), as the target got them.
    # (A floor that falls on 0 is taken one tick later: 0 means "none".)
    floor_in = (wrap(inputs.target_tsval + ts_out) or 1) if c.timestamps else 0
    floor_out = (wrap(inputs.client_syn_tsval + ts_in) or 1) if c.timestamps else 0
    to_target = Translation(
        saddr=f.local[0], daddr=f.remote[0], sport=f.local[1], dport=f.remote[1],
        seq_delta=d_in, ack_delta=d_out, tsval_delta=ts_in, tsecr_delta=ts_out,
        wscale_in=c.snd_wscale, wscale_out=f.rcv_wscale, tsecr_floor=floor_in,
    )
    to_client = Translation(
        saddr=c.local[0], daddr=c.remote[0], sport=c.local[1], dport=c.remote[1],
        seq_delta=d_out, ack_delta=d_in, tsval_delta=ts_out, tsecr_delta=ts_in,
        wscale_in=f.snd_wscale, wscale_out=c.rcv_wscale, tsecr_floor=floor_out,
    )
    return to_target, to_client


def rescale_window(window: int, shift_in: int, shift_out: int) -> int:
    """The 16-bit window field as the receiver must read it; a non-zero window
    never becomes zero (that would stall the sender until it probes)."""
    real = window << shift_in
    scaled = min(real >> shift_out, 0xFFFF)
    return 1 if scaled == 0 and window != 0 else scaled


@dataclass(frozen=True, slots=True)
class TcpFields:
    """The fields of a TCP/IPv4 segment the translation touches."""

    saddr: str
    daddr: str
    sport: int
    dport: int
    seq: int
    ack: int
    window: int
    tsval: int | None = None
    tsecr: int | None = None
    sack: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class AckShift:
    """A re-handoff in place moved the ack translation of the target's packets
    at the end of a rerouted request (``flow_entry.shift`` of the target's
    egress entry; the agent installs it on the router's SHIFT).

    The server received the rewritten request R' at [START, END) of its own
    sequence space, where the client sent the original R, of another length:
    acks up to START keep PREV_DELTA (the translation before R), acks from END
    on take the entry's new ``ack_delta``. An edge inside R' has no exact
    image in the client's space; it is rounded so that the client never hears
    of more than the server has (``shift_edge``). Conntrack keeps the same
    one-step history for the sequence adjustment of its FTP helper."""

    start: int
    end: int
    prev_delta: int


def seq_after(a: int, b: int) -> bool:
    """A is after B in sequence space (RFC 1982 serial arithmetic)."""
    return 0 < wrap(a - b) < 1 << 31


def shift_edge(edge: int, delta: int, shift: AckShift | None, *, left: bool = False) -> int:
    """An ack or a SACK edge of the server's, in the client's space. The
    cumulative ack and a block's right edge round down inside the shifted
    request (to where R starts: R is not acknowledged until all of R' is), a
    block's left edge rounds up (to where R ends: no byte of R is claimed)."""
    if shift is None:
        return wrap(edge - delta)
    if not seq_after(edge, shift.start):
        return wrap(edge - shift.prev_delta)
    if not seq_after(shift.end, edge):
        return wrap(edge - delta)
    return wrap(shift.end - delta) if left else wrap(shift.start - shift.prev_delta)


def translate_fields(fields: TcpFields, x: Translation, shift: AckShift | None = None) -> TcpFields:
    """FIELDS rewritten by X; SHIFT: the ack history of a target's egress entry."""
    return replace(
        fields,
        saddr=x.saddr, daddr=x.daddr, sport=x.sport, dport=x.dport,
        seq=wrap(fields.seq + x.seq_delta),
        ack=shift_edge(fields.ack, x.ack_delta, shift),
        window=rescale_window(fields.window, x.wscale_in, x.wscale_out),
        tsval=None if fields.tsval is None else wrap(fields.tsval + x.tsval_delta),
        tsecr=None if fields.tsecr is None else (
            wrap(fields.tsecr - x.tsecr_delta) if echo_is_genuine(fields.tsecr, x.tsecr_floor) else 0),
        sack=tuple((shift_edge(a, x.ack_delta, shift, left=True), shift_edge(b, x.ack_delta, shift))
                   for a, b in fields.sack),
    )
