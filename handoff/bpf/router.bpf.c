// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * Router side of the handoff, attached with tc (clsact, direct action).
 *
 * ingress: a handed-off client's packets are rewritten onto the forwarding
 *          connection and redirected to the target before the router's stack
 *          could answer them with a RST; the target's packets on a forwarding
 *          connection being set up are watched (SYN-ACK options, TSval); the
 *          target's mirrored request ACKs are trimmed to pure ACKs.
 * egress:  the router's SYN on a watched forwarding connection announces the
 *          client's MSS and only the options the client negotiated.
 */
#define ARR_ROLE_ROUTER
#include "arr_handoff.h"

/* The target's SYN-ACK options and its latest TSval, for the translation;
 * the ack of its FIN, for the close of a rebuilt forwarding connection. */
static __always_inline void record_target(struct __sk_buff *skb, const struct pkt *p,
					  struct watch_entry *w)
{
	struct opt_walk walk = {};
	__be32 ack_be;

	if ((p->flags & (TCPF_FIN | TCPF_ACK)) == (TCPF_FIN | TCPF_ACK) &&
	    bpf_skb_load_bytes(skb, p->l4 + 8, &ack_be, 4) == 0)
		w->target_fin_ack = bpf_ntohl(ack_be);

	walk.mode = OPT_RECORD;
	if (opt_load(skb, p, &walk) < 0 || opt_apply(skb, p, &walk) < 0)
		return;
	if (walk.seen & WATCH_OPT_TS)
		w->target_tsval = walk.tsval;
	if ((p->flags & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK)) {
		w->synack_mss = walk.mss_seen;
		w->synack_wscale = walk.wscale_seen;
		w->synack_opts = walk.seen;
		__sync_fetch_and_add(&w->synacks, 1);
		count(STAT_SYNACK_RECORDED);
	}
}

/* A clone of a target packet that acknowledged the request: keep only what
 * the router's forwarding socket needs (the ACK, no further than its request:
 * watch_entry.request_end says why) and none of the response. */
static __always_inline int trim_mirror(struct __sk_buff *skb, const struct pkt *p,
				       struct watch_entry *w)
{
	__u8 hdr[60];
	__u32 headers = p->l4 + p->tcp_len;
	__u32 hlen = p->tcp_len;
	__be16 old_tot = bpf_htons(p->ip_total), new_tot;
	struct {
		__be32 saddr, daddr;
		__u8 zero, proto;
		__be16 len;
	} pseudo;
	__s64 sum;
	__u16 check;

	if (p->flags & TCPF_RST)
		return TC_ACT_OK;
	if (hlen > 60)
		return TC_ACT_SHOT;
	if (skb->len > headers && bpf_skb_change_tail(skb, headers, 0) < 0)
		return TC_ACT_SHOT;
	new_tot = bpf_htons(headers - p->l3);
	if (bpf_l3_csum_replace(skb, p->l3 + 10, old_tot, new_tot, 2) < 0 ||
	    bpf_skb_store_bytes(skb, p->l3 + 2, &new_tot, 2, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, p->l4, hdr, hlen) < 0)
		return TC_ACT_SHOT;
	put_be32(&hdr[4], w->rcv_nxt);
	if (w->request_end && seq_after(get_be32(&hdr[8]), w->request_end))
		put_be32(&hdr[8], w->request_end);
	hdr[13] &= ~(TCPF_FIN | TCPF_PSH);
	hdr[16] = 0;
	hdr[17] = 0;
	pseudo.saddr = p->key.saddr;
	pseudo.daddr = p->key.daddr;
	pseudo.zero = 0;
	pseudo.proto = IPPROTO_TCP;
	pseudo.len = bpf_htons(hlen);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
	if (sum < 0)
		return TC_ACT_SHOT;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)hdr, hlen, sum);
	if (sum < 0)
		return TC_ACT_SHOT;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	/* csum_diff sums in host order: the folded result is stored as is. */
	check = ~sum;
	__builtin_memcpy(&hdr[16], &check, sizeof(check));
	if (bpf_skb_store_bytes(skb, p->l4, hdr, hlen, BPF_F_RECOMPUTE_CSUM) < 0)
		return TC_ACT_SHOT;
	__sync_fetch_and_add(&w->mirrored, 1);
	count(STAT_MIRROR_TRIMMED);
	return TC_ACT_OK;
}

/* Whether a client segment can belong to the handed-off connection: its seq
 * within the largest possible window of what the client has sent so far (a
 * stale or foreign segment must neither reach the target nor keep the entry
 * alive); an accepted one moves the mark on. Its seq is left in *seq. */
static __always_inline int client_in_window(struct __sk_buff *skb, const struct pkt *p,
					    struct flow_entry *e, __u32 *seq_out)
{
	__be32 seq_be;
	__u32 seq, end, mark = e->seq_next;
	__s32 distance;

	if (bpf_skb_load_bytes(skb, p->l4 + 4, &seq_be, 4) < 0)
		return 0;
	seq = bpf_ntohl(seq_be);
	*seq_out = seq;
	if (mark) {
		distance = (__s32)(seq - mark);
		if (distance > (__s32)SEQ_WINDOW_MAX || distance < -(__s32)SEQ_WINDOW_MAX)
			return 0;
	}
	end = seq + payload_len(p) + (p->flags & TCPF_FIN ? 1 : 0);
	if (!mark || seq_after(end, mark))
		e->seq_next = end ? end : 1; /* 0 means "not learnt yet" */
	return 1;
}

/* Payload beyond take_from: a request the router has not routed yet. */
static __always_inline int new_request(const struct pkt *p, const struct flow_entry *e, __u32 seq)
{
	__u32 len = payload_len(p);

	return e->take_from && len && seq_after(seq + len, e->take_from);
}

/* The new request's bytes (from take_from on) to userspace, in pieces of
 * ARR_CAPTURE_CHUNK, each with the segment's TCP header: the router rebuilds
 * the client's socket with them as its receive queue (handoff/takeback.py). */
static __always_inline void capture(struct __sk_buff *skb, const struct pkt *p,
				    const struct flow_entry *e, __u32 seq)
{
	__u32 len = payload_len(p);
	__u32 data_at = p->l4 + p->tcp_len;
	__u32 hlen = p->tcp_len;
	__u32 start = 0;

	if (seq_after(e->take_from, seq))
		start = e->take_from - seq; /* bytes before it were routed already */
	if (hlen < 20 || hlen > 60)
		return;
	for (int i = 0; i < ARR_CAPTURE_CHUNKS; i++) {
		struct arr_capture *c;
		__u32 off = start + i * ARR_CAPTURE_CHUNK;
		__u32 n;

		if (off >= len)
			break;
		n = len - off;
		if (n > ARR_CAPTURE_CHUNK)
			n = ARR_CAPTURE_CHUNK;
		if (n < 1)
			break;
		c = bpf_ringbuf_reserve(&arr_events, sizeof(*c), 0);
		if (!c) {
			count(STAT_CAPTURE_LOST);
			return;
		}
		c->key = p->key;
		c->kind = ARR_EV_CAPTURE;
		c->conn_id = e->conn_id;
		c->offset = off;
		c->len = n;
		c->tcp_len = hlen;
		if (bpf_skb_load_bytes(skb, p->l4, c->tcp, hlen) < 0 ||
		    bpf_skb_load_bytes(skb, data_at + off, c->data, n) < 0) {
			bpf_ringbuf_discard(c, 0);
			count(STAT_CAPTURE_LOST);
			return;
		}
		bpf_ringbuf_submit(c, 0);
	}
	count(STAT_CAPTURED);
}

/* The header of the client's answer to the router's probe (a take-back the
 * router started, handoff/migrate.py): its seq, ack, window and timestamps
 * are the state the router rebuilds the client's socket from. A capture
 * record with no data; the flag asked for one. */
static __always_inline void capture_header(struct __sk_buff *skb, const struct pkt *p,
					   struct flow_entry *e)
{
	struct arr_capture *c;
	__u32 hlen = p->tcp_len;

	if (hlen < 20 || hlen > 60)
		return;
	c = bpf_ringbuf_reserve(&arr_events, sizeof(*c), 0);
	if (!c) {
		count(STAT_CAPTURE_LOST);
		return; /* the router probes again */
	}
	c->key = p->key;
	c->kind = ARR_EV_CAPTURE;
	c->conn_id = e->conn_id;
	c->offset = 0;
	c->len = 0;
	c->tcp_len = hlen;
	if (bpf_skb_load_bytes(skb, p->l4, c->tcp, hlen) < 0) {
		bpf_ringbuf_discard(c, 0);
		return;
	}
	bpf_ringbuf_submit(c, 0);
	__sync_fetch_and_and(&e->flags, ~FLOW_F_WANT_HEADER);
	count(STAT_HEADER_CAPTURED);
}

/* The client's latest ack and window, read by userspace while it takes the
 * connection back (it waits for the previous response to be acknowledged)
 * and when it moves one (handoff/migrate.py: its probe is one below). */
static __always_inline void note_client_ack(struct __sk_buff *skb, const struct pkt *p,
					    struct flow_entry *e)
{
	__be32 ack_be;
	__be16 win_be;

	if (!(p->flags & TCPF_ACK))
		return;
	if (bpf_skb_load_bytes(skb, p->l4 + 8, &ack_be, 4) == 0)
		e->peer_ack = bpf_ntohl(ack_be);
	if (bpf_skb_load_bytes(skb, p->l4 + 14, &win_be, 2) == 0)
		e->peer_window = bpf_ntohs(win_be);
}

/* Payload before take_from after a re-handoff in place: the server holds it
 * under other offsets (the rewritten request, or what preceded it), so it is
 * never forwarded. A retransmission of the rerouted request itself means the
 * client has not heard the server acknowledge it: userspace resends the
 * rewritten request (handoff/inplace.py), the client keeping the timer. */
static __always_inline int rerouted(const struct pkt *p, struct flow_entry *e, __u32 seq)
{
	__u32 len = payload_len(p);

	if (!e->shift.active || !len)
		return 0;
	if (seq_after(seq + len, e->shift.start)) {
		emit(&p->key, ARR_EV_RESEND, e->conn_id);
		count(STAT_REROUTED_RESENT);
	} else {
		count(STAT_HELD);
	}
	return 1;
}

/* FLOW_TAKEBACK: the client's new bytes go to userspace (and are dropped
 * here: the rebuilt socket acknowledges them); its RST still reaches the
 * target; its pure ACKs too (a response may still be on its way to the
 * client); both with their seq pinned to take_from, where the target's
 * stream stops.
 * A FIN is dropped: the client sends it again to the rebuilt socket. */
static __always_inline int while_taken_back(struct __sk_buff *skb, const struct pkt *p,
					    struct flow_entry *e, __u32 seq, struct xlate *x)
{
	if ((e->flags & FLOW_F_WANT_HEADER) && !payload_len(p) &&
	    !(p->flags & (TCPF_SYN | TCPF_FIN | TCPF_RST)))
		capture_header(skb, p, e);
	if (new_request(p, e, seq)) {
		capture(skb, p, e, seq);
		account(e, skb, p, 0);
		return TC_ACT_SHOT;
	}
	if (rerouted(p, e, seq))
		return TC_ACT_SHOT;
	if (!(p->flags & TCPF_RST) && ((p->flags & TCPF_FIN) || payload_len(p))) {
		count(STAT_HELD);
		return TC_ACT_SHOT;
	}
	/* Pinned, the RST is exact at the target (RFC 5961 would answer one
	 * beyond its rcv_nxt with a challenge ACK, not a reset). */
	x->seq_delta += e->take_from - seq;
	account(e, skb, p, (p->flags & TCPF_RST) ? ARR_EVM_RST : 0);
	return -1;
}

SEC("tc")
int arr_router_ingress(struct __sk_buff *skb)
{
	struct flow_entry *e;
	struct watch_entry *w;
	struct xlate x;
	struct pkt p;
	__u32 stat = STAT_REWRITTEN;
	__u32 seq = 0;
	int verdict;

	if (parse_tcp4(skb, &p) < 0)
		return TC_ACT_OK;
	e = bpf_map_lookup_elem(&arr_ingress, &p.key);
	if (e) {
		if (e->state == FLOW_ENDED) {
			count(STAT_PASSED_ENDED);
			return TC_ACT_OK;
		}
		if (e->state != FLOW_ACTIVE && e->state != FLOW_TAKEBACK) {
			/* The client retransmits; by then its state is read and the
			 * entry is active (or gone, after a fallback). */
			count(STAT_HELD);
			return TC_ACT_SHOT;
		}
		verdict = end_on_syn(skb, &p, e);
		if (verdict >= 0)
			return verdict;
		if (!client_in_window(skb, &p, e, &seq)) {
			count(STAT_OUT_OF_WINDOW);
			return TC_ACT_SHOT;
		}
		x = e->x;
		note_client_ack(skb, &p, e);
		if (e->state == FLOW_TAKEBACK) {
			verdict = while_taken_back(skb, &p, e, seq, &x);
			if (verdict >= 0)
				return verdict;
		} else if (new_request(&p, e, seq)) {
			/* A request the router has not routed: it takes the
			 * connection back (handoff/takeback.py) and decides it. */
			e->state = FLOW_TAKEBACK;
			verdict = while_taken_back(skb, &p, e, seq, &x);
			if (verdict >= 0)
				return verdict;
		} else if (rerouted(&p, e, seq)) {
			return TC_ACT_SHOT;
		} else {
			/* The client's RST: its agent is asked at once (the target's
			 * kernel sends nothing the agent would see). A new SYN is
			 * reported by end_on_syn; the client's FIN needs no report,
			 * the target's answer to it is seen by its agent. */
			account(e, skb, &p, ARR_EVM_RST);
		}
		if (apply_xlate(skb, &p, &x, NULL) < 0) {
			__sync_fetch_and_add(&e->errors, 1);
			count(STAT_REWRITE_FAILED);
			return TC_ACT_SHOT;
		}
		verdict = forward(skb, &x, &stat);
		count(stat);
		return verdict;
	}
	w = bpf_map_lookup_elem(&arr_watch, &p.key);
	if (!w)
		return TC_ACT_OK;
	if (w->state == WATCH_HANDED_OFF)
		return trim_mirror(skb, &p, w);
	if (w->state == WATCH_CLOSED) {
		/* A SYN-ACK answers a SYN the router's own stack sent on this
		 * 4-tuple: a new connection, not the released one. */
		if ((p.flags & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK))
			return TC_ACT_OK;
		count(STAT_DROPPED_AFTER_CLOSE);
		return TC_ACT_SHOT;
	}
	record_target(skb, &p, w);
	return TC_ACT_OK;
}

SEC("tc")
int arr_router_egress(struct __sk_buff *skb)
{
	struct opt_walk walk = {};
	struct flow_key reverse;
	struct watch_entry *w;
	struct pkt p;

	if (parse_tcp4(skb, &p) < 0)
		return TC_ACT_OK;
	if ((p.flags & (TCPF_SYN | TCPF_ACK)) != TCPF_SYN)
		return TC_ACT_OK;
	reverse.saddr = p.key.daddr;
	reverse.daddr = p.key.saddr;
	reverse.sport = p.key.dport;
	reverse.dport = p.key.sport;
	w = bpf_map_lookup_elem(&arr_watch, &reverse);
	if (!w || w->state != WATCH_CONNECTING)
		return TC_ACT_OK; /* a SYN of another connection: not ours to touch */
	walk.mode = OPT_NORMALISE;
	walk.mss = w->client_mss;
	walk.sack_ok = w->client_sack;
	walk.ts_ok = w->client_ts;
	if (opt_load(skb, &p, &walk) < 0 || opt_apply(skb, &p, &walk) < 0)
		return TC_ACT_OK;
	if (walk.changed) {
		__sync_fetch_and_add(&w->syn_rewrites, 1);
		count(STAT_SYN_NORMALISED);
	}
	return TC_ACT_OK;
}

/* The kernel knows no "Apache/GPL" dual string; the object declares the GPL-2.0
 * side of its SPDX expression (LICENSES/GPL-2.0-only.txt). */
char LICENSE[] SEC("license") = "GPL";
