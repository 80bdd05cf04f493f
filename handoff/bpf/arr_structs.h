/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * arr handoff: the layouts of map keys and values (mirrored field for field by
 * handoff/maps.py, checked against BTF by tests/unit/test_bpf_layout.py), the
 * ring buffer's record, and the programs' own working structures.
 */
#ifndef ARR_STRUCTS_H
#define ARR_STRUCTS_H

#include <linux/types.h>
#include "arr_consts.h"

/* A TCP/IPv4 flow as it appears in a packet: source first, network order. */
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

/* How one direction is rewritten (translate.Translation). Deltas in host order. */
struct xlate {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 seq_delta;   /* added to seq */
	__u32 ack_delta;   /* subtracted from ack and from SACK edges */
	__u32 tsval_delta; /* added to TSval */
	__u32 tsecr_delta; /* subtracted from TSecr */
	__u8 wscale_in;    /* the sender's window shift */
	__u8 wscale_out;   /* the shift the receiver applies */
	__u8 pad[2];
	__u32 tsecr_floor; /* an arriving TSecr before it echoes the router's own TSval:
			    * it leaves as 0 (translate.Translation.tsecr_floor says why);
			    * 0: no floor */
};

/* A re-handoff in place (handoff/inplace.py): the client's request R went to
 * the same server, rewritten as R', on the same connection.
 * Target (translate.AckShift): the server received R' at [start, end) of its
 * sequence space; acks up to start keep prev_delta, acks from end on
 * xlate.ack_delta, edges inside R' are rounded (shift_edge in arr_parse.h).
 * Router: [start, end) is R in the client's space (end is take_from): a
 * retransmission of it asks userspace to resend R' (ARR_EV_RESEND); prev_delta
 * is the seq_delta before R. */
struct ack_shift {
	__u32 start;
	__u32 end;
	__u32 prev_delta;
	__u32 active; /* 0: none; the target's program clears it once the server acked end */
};

enum flow_state {
	FLOW_HOLD = 1,   /* router: drop the client's packets while its state is read */
	FLOW_ACTIVE = 2, /* rewrite and redirect */
	FLOW_ENDED = 3,  /* a new connection took the 4-tuple: pass everything, userspace
			  * ends the old one (handoff/lifecycle.py, handoff/agent.py) */
	FLOW_TAKEBACK = 4, /* router: the client sent a new request; its bytes go to
			    * userspace (captures), which takes the connection back
			    * (handoff/takeback.py); pure ACKs still reach the target */
};

/* Router ingress (key: the client's packets, client -> vip) and target egress
 * (key: the target's packets on the forwarding connection, target -> router). */
struct flow_entry {
	struct xlate x;
	__u32 state;
	__u32 flags;
	__u32 syn_seq;  /* seq of the SYN that opened the connection (router: the client's;
			 * target: its SYN-ACK's): a late copy of it is not a new connection */
	__u32 seq_next; /* router: the client's highest seq + length seen (0: learn it from
			 * the first packet); segments far from it are not this connection's */
	__u64 packets;
	__u64 bytes;
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of the last packet (0: none yet) */
	__u64 created_ns;   /* set by userspace, same clock */
	__u64 errors;       /* packets that could not be rewritten or delivered */
	__u64 conn_id;      /* userspace: the handoff's id, the same on both sides. The
			     * control messages name a connection by it, never by its
			     * 4-tuple, which a later connection may reuse */
	/* Router: what taking the connection back needs (handoff/takeback.py). */
	__u32 take_from;    /* client seq of the first byte not forwarded: payload beyond it
			     * is a request the router has not routed (0: never take back) */
	__u32 peer_ack;     /* router: the client's latest ack field; target: the server's
			     * highest ack (valid once FLOW_F_ACKED is set) */
	__u32 snd_max;      /* target: the server's highest seq + length (+FIN) sent, i.e.
			     * its snd_nxt (valid once FLOW_F_SENT is set) */
	__u16 peer_window;  /* the latest raw window field (router: the client's; target:
			     * the server's) */
	__u16 client_mss;   /* router: the client's MSS (its SYN) */
	__u8 router_wscale; /* router: the window shift the router announced to the client */
	__u8 client_opts;   /* router: WATCH_OPT_SACK | WATCH_OPT_TS the client negotiated */
	__u16 requests;     /* router: requests routed on this connection so far */
	struct ack_shift shift; /* target: set by the agent on the router's SHIFT */
};

/* Router: one piece of a client segment taken back (FLOW_TAKEBACK), in the
 * arr_events ring buffer. A segment longer than ARR_CAPTURE_CHUNK comes in
 * several records; the TCP header (with its options) is in each. */
struct arr_capture {
	struct flow_key key;
	__u32 kind;        /* ARR_EV_CAPTURE */
	__u64 conn_id;
	__u32 offset;      /* of data[0] in the segment's payload */
	__u16 len;         /* bytes in data */
	__u16 tcp_len;     /* bytes of tcp: header and options */
	__u8 tcp[60];
	__u8 data[ARR_CAPTURE_CHUNK];
};

/* Target: while the router waits for its request to be acknowledged (same key
 * as the flow entry). A map of its own so that the program (and userspace, on
 * the router's STOP_MIRROR) can stop mirroring by deleting it, without
 * rewriting the flow entry the program updates.
 *
 * The program stops by itself: once an ack reaches mirror_until it mirrors at
 * most ARR_MIRROR_TAIL_ACKS more pure ACKs, for at most ARR_MIRROR_TAIL_NS,
 * then deletes the state. The tail is for a lost clone of the completing ACK:
 * the router's forwarding socket then retransmits the end of the request (its
 * RTO, 200 ms and doubling), the target's kernel answers every duplicate with
 * a pure (dup)ACK, and the tail carries those to the router. The bound costs
 * nothing but the router's socket: should every tail ACK be lost too, that
 * socket retransmits (duplicates the target drops) until its
 * request_ack_timeout and is then closed silently all the same. */
struct mirror_state {
	__u32 mirror_until; /* forwarding seq after the request (f0 + R') */
	__u32 mirrored_ack; /* highest ack cloned to the router so far */
	__u32 tail_acks;    /* pure ACKs mirrored since the request was all acknowledged */
	__u32 pad;
	__u64 acked_ns;     /* bpf_ktime_get_ns() when it was (0: not yet) */
};

/* Target: the start of the server's latest response on a connection (its
 * first payload segment, which begins "HTTP/"), kept for the agent: it reads
 * the response's framing from it (handoff/framing.py) so that a take-back
 * waits while that response is still being written (handoff/agent.py
 * ``_response_unfinished``). A map of its own, LRU: the agent never deletes
 * it, a later connection's response overwrites it. */
struct response_head {
	__u32 seq;      /* server seq of bytes[0] */
	__u16 len;      /* bytes held (0: none) */
	__u16 tail_len; /* how many of tail's low bytes are the response's (0..ARR_TAIL_BYTES) */
	__u32 tail_end; /* server seq just past the last payload byte sent since seq */
	__u32 pad;
	__u64 tail;     /* the bytes before tail_end, the last one lowest: where a
			 * chunked body ends, "\r\n0\r\n\r\n" (handoff/framing.py) */
	__u8 bytes[ARR_HEAD_BYTES];
};

enum watch_state {
	WATCH_CONNECTING = 1, /* record the target's SYN-ACK, normalise our SYN */
	WATCH_HANDED_OFF = 2, /* turn mirrored copies into pure ACKs at rcv_nxt */
	WATCH_CLOSED = 3,     /* socket closed silently: drop, or its RST would kill the target's side */
};

/* Router: its forwarding connection, keyed as the target's packets arrive
 * (target -> router). */
struct watch_entry {
	__u32 state;
	__u16 client_mss;   /* MSS to announce in the router's SYN (0: leave) */
	__u8 client_sack;   /* the client negotiated SACK: our SYN may offer it */
	__u8 client_ts;     /* the client negotiated timestamps */
	__u32 target_tsval; /* latest TSval seen from the target */
	__u32 rcv_nxt;      /* router's rcv_nxt: mirrored copies get this seq */
	__u16 synack_mss;
	__u8 synack_wscale; /* 0xff: no window scale option */
	__u8 synack_opts;   /* WATCH_OPT_* seen in the SYN-ACK */
	__u32 synacks;      /* SYN-ACKs seen: more than one, and the handshake lost a packet;
			     * the target's socket then starts with RFC 6298's 3 s RTO, so
			     * the forward pool gives no client such a connection */
	__u64 mirrored;     /* mirrored copies received */
	__u64 syn_rewrites; /* router SYNs normalised */
	__u64 closed_ns;    /* userspace: when the router let go (its port's quarantine) */
	__u64 conn_id;      /* userspace: the handoff using the port (flow_entry.conn_id) */
	struct flow_key client; /* userspace: the client's 4-tuple (the ingress entry's key;
				 * zero: not known), so that the agent's GONE, which names the
				 * forwarding connection, ends both entries at once */
	__u32 target_fin_ack; /* ack of the target's latest FIN (0: none seen): once it
			       * covers the router's own FIN, the router's socket is in
			       * TIME_WAIT (handoff/forward_close.py needs no lookup) */
	__u32 request_end;    /* HANDED_OFF: the router's snd_nxt once its request is sent
			       * (0: not known). A mirrored ack beyond it (the client's FIN
			       * or next bytes, translated) is lowered to it: Linux answers an
			       * ack of unsent data with a challenge ACK, in the socket's own
			       * clock, which the target, whose TS.Recent the translated
			       * client already raised, drops as PAWS-old */
};

/* Per-CPU counters of what the programs did; index = enum arr_stat. */
enum arr_stat {
	STAT_REWRITTEN = 0,
	STAT_HELD,
	STAT_REDIRECT_NEIGH,
	STAT_FIB_FAILED,
	STAT_PARSE_SKIPPED,
	STAT_MIRRORED,
	STAT_MIRROR_TRIMMED,
	STAT_SYN_NORMALISED,
	STAT_SYNACK_RECORDED,
	STAT_REWRITE_FAILED,
	STAT_DROPPED_AFTER_CLOSE,
	STAT_ENDED_BY_SYN,     /* an entry ended by a new connection's SYN */
	STAT_STALE_SYN,        /* a late copy of the connection's own SYN, dropped */
	STAT_OUT_OF_WINDOW,    /* a segment that cannot belong to the connection, dropped */
	STAT_PASSED_ENDED,     /* a packet of the new connection on an ended entry's tuple */
	STAT_EVENTS_LOST,      /* an event the ring buffer had no room for (the slow sweep finds it) */
	STAT_MIRROR_DONE,      /* a mirror that ended itself (request acknowledged, tail over) */
	STAT_CAPTURED,         /* client segments with a new request, passed to userspace */
	STAT_CAPTURE_LOST,     /* pieces of them the ring buffer had no room for (the client resends) */
	STAT_HEADER_CAPTURED,  /* a client's answer to a take-back probe, its header passed to userspace */
	STAT_REROUTED_RESENT,  /* a client's retransmission of a request rerouted in place: dropped,
				* userspace resends the rewritten request */
	STAT_MAX,
};

enum arr_event_kind {
	ARR_EV_FIN = 1,       /* the first FIN in the entry's direction */
	ARR_EV_RST = 2,       /* the first RST in the entry's direction */
	ARR_EV_NEW_SYN = 3,   /* a new connection took the 4-tuple: the entry is ENDED */
	ARR_EV_AFTER_FIN = 4, /* a packet after the FIN (e.g. the ACK of the peer's FIN) */
	ARR_EV_CAPTURE = 5,   /* router: a struct arr_capture (a new request's bytes) */
	ARR_EV_RESEND = 6,    /* router: the client resent a request rerouted in place */
};

struct arr_event {
	struct flow_key key; /* the entry's key */
	__u32 kind;          /* enum arr_event_kind */
	__u64 conn_id;
};

/* Where the headers of a TCP/IPv4 packet are; offsets from the frame start. */
struct pkt {
	__u32 l3;       /* IPv4 header */
	__u32 l4;       /* TCP header */
	__u32 tcp_len;  /* TCP header length (doff * 4) */
	__u32 ip_total; /* IP total length */
	__u8 flags;     /* TCP flags byte */
	struct flow_key key;
};

/*
 * TCP options are walked with bpf_loop, one option per callback: the verifier
 * checks the callback once instead of every path through an unrolled loop
 * (which exceeds its budget). The options are copied to the stack, edited
 * there, and written back with one checksum update over the whole 4-byte
 * aligned option area, so fields at odd offsets need no special casing.
 */
enum opt_mode {
	OPT_TRANSLATE = 1, /* TSval/TSecr deltas, SACK edges */
	OPT_RECORD,        /* note the peer's options and TSval */
	OPT_NORMALISE,     /* router SYN: client's MSS, drop what it did not negotiate */
};

struct opt_walk {
	__u8 opts[TCP_OPTS_MAX];
	__u32 len;  /* bytes of options */
	__u32 at;   /* offset of the next option */
	__u32 mode; /* enum opt_mode */
	/* OPT_TRANSLATE */
	__u32 tsval_delta, tsecr_delta, ack_delta, tsecr_floor;
	struct ack_shift shift; /* SACK edges inside a shifted request (target) */
	/* OPT_NORMALISE */
	__u16 mss;
	__u8 sack_ok, ts_ok;
	/* OPT_RECORD results */
	__u32 tsval;
	__u16 mss_seen;
	__u8 wscale_seen; /* 0xff: none */
	__u8 seen;        /* WATCH_OPT_* */
	/* outcome */
	__u8 changed, bad;
};

#endif /* ARR_STRUCTS_H */
