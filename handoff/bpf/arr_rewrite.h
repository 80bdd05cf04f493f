/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * arr handoff: rewriting packets: the blueprint's section 3 table with
 * incremental checksums (the Python reference model is handoff/translate.py
 * and handoff/packet.py: the two must agree packet for packet), accounting
 * and events per entry, and delivery (FIB lookup, redirect).
 */
#ifndef ARR_REWRITE_H
#define ARR_REWRITE_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "arr_maps.h"
#include "arr_parse.h"

/* Replace a 4-byte field of the IP header that the TCP pseudo-header covers. */
static __always_inline int rewrite_addr(struct __sk_buff *skb, const struct pkt *p, __u32 field,
					__be32 old, __be32 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, p->l4 + 16, old, new, BPF_F_PSEUDO_HDR | sizeof(new)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, p->l3 + 10, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l3 + field, &new, sizeof(new), 0);
}

/* Replace 2 or 4 bytes of the TCP header (the checksum covers them directly). */
static __always_inline int rewrite_tcp(struct __sk_buff *skb, const struct pkt *p, __u32 off,
				       __u32 old, __u32 new, __u32 size)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, p->l4 + 16, old, new, size) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4 + off, &new, size, 0);
}

/* The window field as the receiver must read it; a non-zero window never
 * becomes zero (translate.rescale_window). */
static __always_inline __u16 rescale_window(__u16 window, __u8 shift_in, __u8 shift_out)
{
	__u32 real = (__u32)window << (shift_in & 15);
	__u32 scaled = real >> (shift_out & 15);

	if (scaled > 0xffff)
		scaled = 0xffff;
	if (scaled == 0 && window != 0)
		scaled = 1;
	return scaled;
}

/* Walk the options; if any changed, write them back and fix the checksum. */
static __always_inline int opt_apply(struct __sk_buff *skb, const struct pkt *p, struct opt_walk *w)
{
	__u8 old[TCP_OPTS_MAX];
	__s64 diff;
	__u32 len = w->len;

	if (len == 0 || len > TCP_OPTS_MAX)
		return 0;
	__builtin_memcpy(old, w->opts, sizeof(old));
	bpf_loop(TCP_OPTS_MAX, opt_visit, w, 0);
	if (w->bad)
		return -1;
	if (!w->changed)
		return 0;
	diff = bpf_csum_diff((__be32 *)old, len, (__be32 *)w->opts, len, 0);
	if (diff < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, p->l4 + 20, w->opts, len, 0) < 0)
		return -1;
	return bpf_l4_csum_replace(skb, p->l4 + 16, 0, diff, 0);
}

/* Rewrite TSval/TSecr and the SACK edges. */
static __always_inline int rewrite_options(struct __sk_buff *skb, const struct pkt *p,
					   const struct xlate *x, const struct ack_shift *shift)
{
	struct opt_walk w = {};

	w.mode = OPT_TRANSLATE;
	w.tsval_delta = x->tsval_delta;
	w.tsecr_delta = x->tsecr_delta;
	w.tsecr_floor = x->tsecr_floor;
	w.ack_delta = x->ack_delta;
	if (shift)
		w.shift = *shift;
	if (opt_load(skb, p, &w) < 0)
		return -1;
	return opt_apply(skb, p, &w);
}

/* Apply an xlate to every field of the table (addresses, ports, seq, ack,
 * window, options), with incremental checksums. SHIFT (target, may be NULL):
 * the entry's ack history after a re-handoff in place. */
static __always_inline int apply_xlate(struct __sk_buff *skb, const struct pkt *p,
				       const struct xlate *x, const struct ack_shift *shift)
{
	__be32 seq, ack;
	__be16 window;

	if (bpf_skb_load_bytes(skb, p->l4 + 4, &seq, 4) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4 + 8, &ack, 4) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4 + 14, &window, 2) < 0)
		return -1;
	if (rewrite_options(skb, p, x, shift) < 0)
		return -1;
	if (rewrite_addr(skb, p, offsetof(struct iphdr, saddr), p->key.saddr, x->saddr) < 0 ||
	    rewrite_addr(skb, p, offsetof(struct iphdr, daddr), p->key.daddr, x->daddr) < 0)
		return -1;
	if (rewrite_tcp(skb, p, 0, p->key.sport, x->sport, 2) < 0 ||
	    rewrite_tcp(skb, p, 2, p->key.dport, x->dport, 2) < 0)
		return -1;
	if (rewrite_tcp(skb, p, 4, seq, bpf_htonl(bpf_ntohl(seq) + x->seq_delta), 4) < 0 ||
	    rewrite_tcp(skb, p, 8, ack, bpf_htonl(shift_edge(bpf_ntohl(ack), x->ack_delta, shift, 0)), 4) < 0)
		return -1;
	return rewrite_tcp(skb, p, 14, window,
			   bpf_htons(rescale_window(bpf_ntohs(window), x->wscale_in, x->wscale_out)), 2);
}

/* Count the packet and the FIN/RST it carries in the entry (shared across
 * CPUs), and report what EVENTS (ARR_EVM_*) asks for: the first FIN, the
 * first RST, packets after a FIN. Two CPUs may both report a first: an event
 * is a hint, a duplicate costs one more look. */
static __always_inline void account(struct flow_entry *e, struct __sk_buff *skb, const struct pkt *p,
				    __u32 events)
{
	__u32 before = e->flags;
	__u32 kind = 0;

	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, skb->len);
	e->last_seen_ns = bpf_ktime_get_ns();
	if (p->flags & TCPF_FIN)
		__sync_fetch_and_or(&e->flags, FLOW_F_FIN);
	if (p->flags & TCPF_RST)
		__sync_fetch_and_or(&e->flags, FLOW_F_RST);
	if (p->flags & TCPF_RST) {
		if (!(before & FLOW_F_RST))
			kind = ARR_EV_RST;
	} else if (before & FLOW_F_FIN) {
		kind = ARR_EV_AFTER_FIN;
	} else if (p->flags & TCPF_FIN) {
		kind = ARR_EV_FIN;
	}
	if (kind && (events & (1U << kind)))
		emit(&p->key, kind, e->conn_id);
}

/* A SYN on an active entry's 4-tuple: a late copy of the connection's own SYN
 * (dropped) or a new connection, which ends the entry (its packets then pass to
 * the local stack). Returns the verdict, or -1 when the packet is no SYN. */
static __always_inline int end_on_syn(struct __sk_buff *skb, const struct pkt *p, struct flow_entry *e)
{
	__be32 seq;

	if (!(p->flags & TCPF_SYN))
		return -1;
	if (bpf_skb_load_bytes(skb, p->l4 + 4, &seq, 4) < 0)
		return TC_ACT_SHOT;
	if (bpf_ntohl(seq) == e->syn_seq) {
		count(STAT_STALE_SYN);
		return TC_ACT_SHOT;
	}
	e->state = FLOW_ENDED;
	e->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_or(&e->flags, FLOW_F_NEW_SYN);
	count(STAT_ENDED_BY_SYN);
	emit(&p->key, ARR_EV_NEW_SYN, e->conn_id);
	return TC_ACT_OK;
}

/* Send the rewritten packet towards its new destination: next hop from the
 * FIB; when the neighbour is not resolved yet, let the kernel resolve it. */
static __always_inline int forward(struct __sk_buff *skb, const struct xlate *x, __u32 *stat)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_TCP;
	fib.sport = x->sport;
	fib.dport = x->dport;
	fib.ipv4_src = x->saddr;
	fib.ipv4_dst = x->daddr;
	fib.ifindex = skb->ifindex;
	/* tot_len stays 0: the kernel then checks the MTU with
	 * is_skb_forwardable(), which understands GSO packets; a tot_len of a
	 * 64 KiB TSO packet would be refused as FRAG_NEEDED. */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
			return TC_ACT_SHOT;
		*stat = STAT_REWRITTEN;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		*stat = STAT_REDIRECT_NEIGH;
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	}
	*stat = STAT_FIB_FAILED;
	return TC_ACT_SHOT;
}

#endif /* ARR_REWRITE_H */
