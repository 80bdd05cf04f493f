// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * Target side of the handoff, attached with tc (clsact, direct action) on
 * egress of the interface that leads to the router.
 *
 * The target's unmodified server answers on the forwarding connection
 * (target -> router); each such packet is rewritten onto the client's
 * connection (vip -> client) and sent straight to the client. While the
 * router still waits for its request to be acknowledged, packets that
 * acknowledge it are also cloned, unrewritten, to the router; the mirror
 * ends by itself once the request is acknowledged (and a short tail is over).
 * The target's FIN, RST and what follows its FIN are reported to the agent
 * through the arr_events ring buffer.
 */
#define ARR_ROLE_TARGET
#include "arr_handoff.h"

/* Clone to the router the packets that (newly) acknowledge the request, and
 * pure ACKs (cheap, and they carry the dupacks that answer the router's
 * retransmissions). Once the request is all acknowledged, only a bounded tail
 * of pure ACKs (struct mirror_state says why); returns 1 when the mirror is
 * over and its state can go. */
static __always_inline int mirror(struct __sk_buff *skb, const struct pkt *p, struct mirror_state *m)
{
	__be32 ack_be;
	__u32 ack;
	int advances;

	if (m->acked_ns) {
		if (payload_len(p) != 0)
			return 0;
		if (m->tail_acks >= ARR_MIRROR_TAIL_ACKS ||
		    bpf_ktime_get_ns() - m->acked_ns > ARR_MIRROR_TAIL_NS)
			return 1;
		m->tail_acks += 1;
		goto clone;
	}
	if (bpf_skb_load_bytes(skb, p->l4 + 8, &ack_be, 4) < 0)
		return 0;
	ack = bpf_ntohl(ack_be);
	advances = seq_after(ack, m->mirrored_ack) && seq_after(m->mirror_until, m->mirrored_ack);
	if (!advances && payload_len(p) != 0)
		return 0;
	if (advances) {
		m->mirrored_ack = ack;
		if (!seq_after(m->mirror_until, ack))
			m->acked_ns = bpf_ktime_get_ns() | 1; /* never 0: 0 means "not yet" */
	}
clone:
	skb->mark = ARR_MIRROR_MARK;
	if (bpf_clone_redirect(skb, skb->ifindex, 0) == 0)
		count(STAT_MIRRORED);
	skb->mark = 0;
	return 0;
}

/* The server's snd_nxt and window as they leave (target seq space): the
 * router asks for them when it takes the connection back (TAKEBACK), to know
 * that the client has acknowledged every byte of the response. And the
 * server's highest ack: the agent shifts the ack translation (SHIFT) only
 * at a point the server has acknowledged (handoff/agent.py). */
static __always_inline void note_sent(struct __sk_buff *skb, const struct pkt *p, struct flow_entry *e)
{
	__be32 seq_be, ack_be;
	__be16 win_be;
	__u32 end, ack;

	if ((p->flags & TCPF_ACK) && bpf_skb_load_bytes(skb, p->l4 + 8, &ack_be, 4) == 0) {
		ack = bpf_ntohl(ack_be);
		if (!(e->flags & FLOW_F_ACKED) || seq_after(ack, e->peer_ack)) {
			e->peer_ack = ack;
			if (!(e->flags & FLOW_F_ACKED))
				__sync_fetch_and_or(&e->flags, FLOW_F_ACKED);
		}
	}

	if (p->flags & TCPF_RST)
		return;
	if (bpf_skb_load_bytes(skb, p->l4 + 4, &seq_be, 4) < 0)
		return;
	end = bpf_ntohl(seq_be) + payload_len(p) + (p->flags & TCPF_FIN ? 1 : 0);
	if (!(e->flags & FLOW_F_SENT) || seq_after(end, e->snd_max)) {
		e->snd_max = end;
		if (!(e->flags & FLOW_F_SENT))
			__sync_fetch_and_or(&e->flags, FLOW_F_SENT);
	}
	if (bpf_skb_load_bytes(skb, p->l4 + 14, &win_be, 2) == 0)
		e->peer_window = bpf_ntohs(win_be);
}

/* The last bytes the server has sent of its latest response: the agent
 * finds a chunked body's end in them (handoff/framing.py). They are a shift
 * register, each segment's new bytes pushed in at the low end, so that a
 * segment shorter than the terminator (nginx often writes the last chunk
 * alone) still leaves the bytes before it. Only bytes past tail_end are new;
 * a retransmission moves nothing. */
static __always_inline void note_tail(struct __sk_buff *skb, __u32 off, __u32 seq, __u32 len,
				      struct response_head *h)
{
	union {
		__u8 b[ARR_TAIL_BYTES];
		__u64 v;
	} buf = {};
	__u32 end = seq + len, fresh, i;
	__u8 byte;

	if (!seq_after(end, h->tail_end))
		return;
	if (seq_after(seq, h->tail_end)) {
		/* A gap (the program saw every segment leave, so only after a
		 * lost update): what lay before this segment is unknown. */
		h->tail_len = 0;
		fresh = len;
	} else {
		fresh = end - h->tail_end;
	}
	h->tail_end = end;
	if (fresh >= ARR_TAIL_BYTES) {
		if (bpf_skb_load_bytes(skb, off + len - ARR_TAIL_BYTES, buf.b, ARR_TAIL_BYTES) < 0)
			goto unknown;
		h->tail = bpf_be64_to_cpu(buf.v);
		h->tail_len = ARR_TAIL_BYTES;
		return;
	}
	/* Byte by byte: a load of a variable size the verifier cannot bound
	 * away from zero. Short segments are few (a chunk's last lines). */
	for (i = 0; i < ARR_TAIL_BYTES - 1; i++) {
		if (i >= fresh)
			break;
		if (bpf_skb_load_bytes(skb, off + len - fresh + i, &byte, 1) < 0)
			goto unknown;
		h->tail = (h->tail << 8) | byte;
	}
	h->tail_len = h->tail_len + fresh > ARR_TAIL_BYTES ? ARR_TAIL_BYTES : h->tail_len + fresh;
	return;
unknown:
	h->tail_len = 0;
}

/* A payload segment that starts a response ("HTTP/"): its first bytes, for
 * the agent (struct response_head); every payload segment after it: its last
 * bytes (note_tail). A retransmission of that start finds them kept; a body
 * that happens to begin a segment with "HTTP/" is kept too, and the agent,
 * finding no framing in it, goes by TCP alone, as without. */
static __always_inline void note_response(struct __sk_buff *skb, const struct pkt *p)
{
	struct response_head *h;
	__u32 len = payload_len(p), off = p->l4 + p->tcp_len, seq, n, zero = 0;
	__be32 seq_be;
	char magic[5];

	if (len < 1 || bpf_skb_load_bytes(skb, p->l4 + 4, &seq_be, 4) < 0)
		return;
	seq = bpf_ntohl(seq_be);
	h = bpf_map_lookup_elem(&arr_response, &p->key);
	if (len < sizeof(magic) || bpf_skb_load_bytes(skb, off, magic, sizeof(magic)) < 0 ||
	    magic[0] != 'H' || magic[1] != 'T' || magic[2] != 'T' || magic[3] != 'P' || magic[4] != '/' ||
	    (h && h->len && h->seq == seq)) {
		if (h)
			note_tail(skb, off, seq, len, h);
		return;
	}
	if (!h) {
		struct response_head *blank = bpf_map_lookup_elem(&arr_response_blank, &zero);

		if (!blank || bpf_map_update_elem(&arr_response, &p->key, blank, BPF_ANY) < 0)
			return;
		h = bpf_map_lookup_elem(&arr_response, &p->key);
		if (!h)
			return;
	}
	h->tail_end = seq;
	h->tail_len = 0;
	note_tail(skb, off, seq, len, h);
	n = len > ARR_HEAD_BYTES ? ARR_HEAD_BYTES : len;
	h->len = 0;
	h->seq = seq;
	if (n < 1 || n > ARR_HEAD_BYTES || bpf_skb_load_bytes(skb, off, h->bytes, n) < 0)
		return;
	h->len = n;
}

SEC("tc")
int arr_target_egress(struct __sk_buff *skb)
{
	struct mirror_state *m;
	struct flow_entry *e;
	struct ack_shift shift;
	struct xlate x;
	struct pkt p;
	__u32 stat = STAT_REWRITTEN;
	int verdict;

	if (skb->mark == ARR_MIRROR_MARK)
		return TC_ACT_OK;
	if (parse_tcp4(skb, &p) < 0)
		return TC_ACT_OK;
	e = bpf_map_lookup_elem(&arr_egress, &p.key);
	if (!e)
		return TC_ACT_OK;
	if (e->state == FLOW_ENDED) {
		count(STAT_PASSED_ENDED);
		return TC_ACT_OK;
	}
	if (e->state != FLOW_ACTIVE)
		return TC_ACT_OK;
	/* A SYN-ACK: the server accepted a new connection on this 4-tuple (the
	 * router's health probe, say), or repeats the forwarding handshake's. */
	verdict = end_on_syn(skb, &p, e);
	if (verdict >= 0) {
		if (verdict == TC_ACT_OK)
			bpf_map_delete_elem(&arr_mirror, &p.key);
		return verdict;
	}
	m = bpf_map_lookup_elem(&arr_mirror, &p.key);
	if (m && mirror(skb, &p, m)) {
		bpf_map_delete_elem(&arr_mirror, &p.key);
		count(STAT_MIRROR_DONE);
	}
	x = e->x;
	/* This packet's history, before the server's ack may end it (its SACK
	 * blocks can still reach below the shifted request). */
	shift = e->shift;
	/* The target's FIN and RST, and what follows its FIN (the ACK of the
	 * client's FIN that puts its socket in TIME_WAIT): the agent looks at
	 * the socket then (handoff/agent_lifecycle.py). */
	account(e, skb, &p, ARR_EVM_FIN | ARR_EVM_RST | ARR_EVM_AFTER_FIN);
	note_sent(skb, &p, e);
	note_response(skb, &p);
	/* The server has all of the rerouted request: every later ack takes the
	 * new delta, and the history goes before sequence numbers wrap around. */
	if (shift.active && (e->flags & FLOW_F_ACKED) && !seq_after(shift.end, e->peer_ack))
		e->shift.active = 0;
	if (apply_xlate(skb, &p, &x, &shift) < 0) {
		__sync_fetch_and_add(&e->errors, 1);
		count(STAT_REWRITE_FAILED);
		return TC_ACT_SHOT;
	}
	verdict = forward(skb, &x, &stat);
	count(stat);
	return verdict;
}

/* The kernel knows no "Apache/GPL" dual string; the object declares the GPL-2.0
 * side of its SPDX expression (LICENSES/GPL-2.0-only.txt). */
char LICENSE[] SEC("license") = "GPL";
