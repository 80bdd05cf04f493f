/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * arr handoff: reading packets: where the headers are, sequence arithmetic,
 * and the TCP option walker (one option per bpf_loop callback).
 */
#ifndef ARR_PARSE_H
#define ARR_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "arr_structs.h"

static __always_inline int parse_tcp4(struct __sk_buff *skb, struct pkt *p)
{
	struct ethhdr eth;
	struct iphdr ip;
	__u8 doff_byte;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return -1;
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return -1;
	p->l3 = sizeof(struct ethhdr);
	if (bpf_skb_load_bytes(skb, p->l3, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_TCP)
		return -1;
	/* Fragments carry no (or a partial) TCP header: never ours to rewrite. */
	if (ip.frag_off & bpf_htons(0x3fff))
		return -1;
	p->l4 = p->l3 + ip.ihl * 4;
	p->ip_total = bpf_ntohs(ip.tot_len);
	if (bpf_skb_load_bytes(skb, p->l4 + 12, &doff_byte, 1) < 0)
		return -1;
	p->tcp_len = (doff_byte >> 4) * 4;
	if (p->tcp_len < 20)
		return -1;
	if (bpf_skb_load_bytes(skb, p->l4 + 13, &p->flags, 1) < 0)
		return -1;
	p->key.saddr = ip.saddr;
	p->key.daddr = ip.daddr;
	if (bpf_skb_load_bytes(skb, p->l4, &p->key.sport, 4) < 0)
		return -1;
	return 0;
}

static __always_inline __u32 payload_len(const struct pkt *p)
{
	__u32 headers = p->l4 - p->l3 + p->tcp_len;

	return p->ip_total > headers ? p->ip_total - headers : 0;
}

/* seq a is after b, modulo 2^32 (RFC 1982 style). */
static __always_inline int seq_after(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0;
}

/* An ack or a SACK edge of the server's, in the client's space
 * (translate.shift_edge): inside a request rerouted in place the cumulative
 * ack and a block's right edge round down to where the client's request
 * starts, a left edge rounds up to where it ends; the client never hears of
 * more than the server has. */
static __always_inline __u32 shift_edge(__u32 edge, __u32 delta, const struct ack_shift *s, int left)
{
	if (!s || !s->active)
		return edge - delta;
	if (!seq_after(edge, s->start))
		return edge - s->prev_delta;
	if (!seq_after(s->end, edge))
		return edge - delta;
	return left ? s->end - delta : s->start - s->prev_delta;
}

static __always_inline __u32 get_be32(const __u8 *b)
{
	return ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
}

static __always_inline void put_be32(__u8 *b, __u32 v)
{
	b[0] = v >> 24;
	b[1] = v >> 16;
	b[2] = v >> 8;
	b[3] = v;
}

static long opt_visit(__u32 n, void *data)
{
	struct opt_walk *w = data;
	__u32 i = w->at;
	__u8 kind, olen;

	if (i >= w->len || i >= TCP_OPTS_MAX)
		return 1;
	kind = w->opts[i];
	if (kind == TCP_OPT_EOL)
		return 1;
	if (kind == TCP_OPT_NOP) {
		w->at = i + 1;
		return 0;
	}
	if (i + 1 >= TCP_OPTS_MAX)
		goto bad;
	olen = w->opts[i + 1];
	if (olen < 2 || i + olen > w->len || i + olen > TCP_OPTS_MAX)
		goto bad;
	w->at = i + olen;

	if (kind == TCP_OPT_TS && olen == 10) {
		if (i + 10 > TCP_OPTS_MAX)
			goto bad;
		if (w->mode == OPT_TRANSLATE && (w->tsval_delta || w->tsecr_delta || w->tsecr_floor)) {
			__u32 ecr = get_be32(&w->opts[i + 6]);

			put_be32(&w->opts[i + 2], get_be32(&w->opts[i + 2]) + w->tsval_delta);
			/* An echo of the router's own TSval leaves as 0 (struct xlate). */
			if (w->tsecr_floor && (ecr == 0 || (__s32)(ecr - w->tsecr_floor) < 0))
				ecr = 0;
			else
				ecr -= w->tsecr_delta;
			put_be32(&w->opts[i + 6], ecr);
			w->changed = 1;
		} else if (w->mode == OPT_RECORD) {
			w->tsval = get_be32(&w->opts[i + 2]);
			w->seen |= WATCH_OPT_TS;
		} else if (w->mode == OPT_NORMALISE && !w->ts_ok) {
			for (int k = 0; k < 10; k++)
				w->opts[i + k] = TCP_OPT_NOP;
			w->changed = 1;
		}
	} else if (kind == TCP_OPT_SACK && w->mode == OPT_TRANSLATE) {
		/* Validated whatever the delta: a packet's fate must not depend on
		 * whether its translation happens to leave SACK as is. */
		if (olen < 10 || (olen - 2) % 8)
			goto bad;
		if (!w->ack_delta && !w->shift.active)
			return 0;
		for (int e = 0; e < 8; e++) { /* up to 4 blocks: 8 edges, left ones even */
			__u32 at = i + 2 + e * 4;

			if (e * 4 + 4 > olen - 2)
				break;
			if (at + 4 > TCP_OPTS_MAX)
				goto bad;
			put_be32(&w->opts[at], shift_edge(get_be32(&w->opts[at]), w->ack_delta, &w->shift,
							  !(e & 1)));
		}
		w->changed = 1;
	} else if (kind == TCP_OPT_MSS && olen == 4) {
		if (i + 4 > TCP_OPTS_MAX)
			goto bad;
		if (w->mode == OPT_RECORD) {
			w->mss_seen = ((__u16)w->opts[i + 2] << 8) | w->opts[i + 3];
		} else if (w->mode == OPT_NORMALISE && w->mss) {
			w->opts[i + 2] = w->mss >> 8;
			w->opts[i + 3] = w->mss & 0xff;
			w->changed = 1;
		}
	} else if (kind == TCP_OPT_WSCALE && olen == 3) {
		if (i + 3 > TCP_OPTS_MAX)
			goto bad;
		if (w->mode == OPT_RECORD) {
			w->wscale_seen = w->opts[i + 2];
			w->seen |= WATCH_OPT_WSCALE;
		}
	} else if (kind == TCP_OPT_SACK_PERM && olen == 2) {
		if (w->mode == OPT_RECORD) {
			w->seen |= WATCH_OPT_SACK;
		} else if (w->mode == OPT_NORMALISE && !w->sack_ok) {
			w->opts[i] = TCP_OPT_NOP;
			w->opts[i + 1] = TCP_OPT_NOP;
			w->changed = 1;
		}
	}
	return 0;
bad:
	w->bad = 1;
	return 1;
}

/* Load the options of the packet into w (w->mode and parameters set by the caller). */
static __always_inline int opt_load(struct __sk_buff *skb, const struct pkt *p, struct opt_walk *w)
{
	w->len = p->tcp_len - 20;
	w->at = 0;
	w->wscale_seen = 0xff;
	if (w->len == 0)
		return 0;
	if (w->len > TCP_OPTS_MAX)
		return -1;
	return bpf_skb_load_bytes(skb, p->l4 + 20, w->opts, w->len);
}

#endif /* ARR_PARSE_H */
