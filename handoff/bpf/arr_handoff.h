/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * arr handoff: the one header shared by the router and target programs.
 *
 * Map layouts (mirrored field for field by handoff/maps.py) and the packet
 * rewrite helpers. The rewrite is the blueprint's section 3 table; the Python
 * reference model is handoff/translate.py and the two must agree packet for
 * packet.
 */
#ifndef ARR_HANDOFF_H
#define ARR_HANDOFF_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* ------------------------------------------------------------------ maps */

/* Entries a connection map holds unless the loader sets another size
 * (handoff/datapath.py, from the capacity setting). Plain hash maps, not LRU:
 * a full map refuses new handoffs (they fall back) and never evicts a live
 * connection's entry. */
#define ARR_DEFAULT_CAPACITY 65536

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
};

enum flow_state {
	FLOW_HOLD = 1,   /* router: drop the client's packets while its state is read */
	FLOW_ACTIVE = 2, /* rewrite and redirect */
	FLOW_ENDED = 3,  /* a new connection took the 4-tuple: pass everything, userspace
			  * ends the old one (handoff/lifecycle.py, handoff/agent.py) */
};

/* flow_entry.flags, set by the programs (atomically), read by userspace. */
#define FLOW_F_FIN (1U << 0)     /* a FIN went through in this entry's direction */
#define FLOW_F_RST (1U << 1)     /* a RST went through in this entry's direction */
#define FLOW_F_NEW_SYN (1U << 2) /* ended: a SYN of a new connection on the same 4-tuple */

/* The largest window TCP can announce (65535 << 14): a segment further than
 * this from what the connection has sent so far cannot belong to it. */
#define SEQ_WINDOW_MAX (1U << 30)

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
};

/* Target: while the router waits for its request to be acknowledged (same key
 * as the flow entry). A map of its own so that userspace can stop mirroring by
 * deleting it, without rewriting the flow entry the program updates. */
struct mirror_state {
	__u32 mirror_until; /* forwarding seq after the request (f0 + R') */
	__u32 mirrored_ack; /* highest ack cloned to the router so far */
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
	__u32 pad;
	__u64 mirrored;     /* mirrored copies received */
	__u64 syn_rewrites; /* router SYNs normalised */
	__u64 closed_ns;    /* userspace: when the router let go (its port's quarantine) */
	__u64 conn_id;      /* userspace: the handoff using the port (flow_entry.conn_id) */
};

#define WATCH_OPT_SACK 1
#define WATCH_OPT_TS 2
#define WATCH_OPT_WSCALE 4

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
	STAT_MAX,
};

/* Each object (router, target) has its own instance of this map. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} arr_stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&arr_stats, &stat);

	if (n)
		*n += 1;
}

#define ARR_MIRROR_MARK 0x0a770001 /* a clone on its way to the router: let it pass */

/* ------------------------------------------------------------- parsing */

#define TCP_OPT_EOL 0
#define TCP_OPT_NOP 1
#define TCP_OPT_MSS 2
#define TCP_OPT_WSCALE 3
#define TCP_OPT_SACK_PERM 4
#define TCP_OPT_SACK 5
#define TCP_OPT_TS 8
#define TCP_OPTS_MAX 40

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_PSH 0x08
#define TCPF_ACK 0x10

/* Where the headers of a TCP/IPv4 packet are; offsets from the frame start. */
struct pkt {
	__u32 l3;       /* IPv4 header */
	__u32 l4;       /* TCP header */
	__u32 tcp_len;  /* TCP header length (doff * 4) */
	__u32 ip_total; /* IP total length */
	__u8 flags;     /* TCP flags byte */
	struct flow_key key;
};

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

/* ------------------------------------------------------------ rewriting */

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
	__u32 tsval_delta, tsecr_delta, ack_delta;
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
		if (w->mode == OPT_TRANSLATE && (w->tsval_delta || w->tsecr_delta)) {
			put_be32(&w->opts[i + 2], get_be32(&w->opts[i + 2]) + w->tsval_delta);
			put_be32(&w->opts[i + 6], get_be32(&w->opts[i + 6]) - w->tsecr_delta);
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
		if (!w->ack_delta)
			return 0;
		for (int e = 0; e < 8; e++) { /* up to 4 blocks: 8 edges */
			__u32 at = i + 2 + e * 4;

			if (e * 4 + 4 > olen - 2)
				break;
			if (at + 4 > TCP_OPTS_MAX)
				goto bad;
			put_be32(&w->opts[at], get_be32(&w->opts[at]) - w->ack_delta);
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
					   const struct xlate *x)
{
	struct opt_walk w = {};

	w.mode = OPT_TRANSLATE;
	w.tsval_delta = x->tsval_delta;
	w.tsecr_delta = x->tsecr_delta;
	w.ack_delta = x->ack_delta;
	if (opt_load(skb, p, &w) < 0)
		return -1;
	return opt_apply(skb, p, &w);
}

/* Apply an xlate to every field of the table (addresses, ports, seq, ack,
 * window, options), with incremental checksums. */
static __always_inline int apply_xlate(struct __sk_buff *skb, const struct pkt *p,
				       const struct xlate *x)
{
	__be32 seq, ack;
	__be16 window;

	if (bpf_skb_load_bytes(skb, p->l4 + 4, &seq, 4) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4 + 8, &ack, 4) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4 + 14, &window, 2) < 0)
		return -1;
	if (rewrite_options(skb, p, x) < 0)
		return -1;
	if (rewrite_addr(skb, p, offsetof(struct iphdr, saddr), p->key.saddr, x->saddr) < 0 ||
	    rewrite_addr(skb, p, offsetof(struct iphdr, daddr), p->key.daddr, x->daddr) < 0)
		return -1;
	if (rewrite_tcp(skb, p, 0, p->key.sport, x->sport, 2) < 0 ||
	    rewrite_tcp(skb, p, 2, p->key.dport, x->dport, 2) < 0)
		return -1;
	if (rewrite_tcp(skb, p, 4, seq, bpf_htonl(bpf_ntohl(seq) + x->seq_delta), 4) < 0 ||
	    rewrite_tcp(skb, p, 8, ack, bpf_htonl(bpf_ntohl(ack) - x->ack_delta), 4) < 0)
		return -1;
	return rewrite_tcp(skb, p, 14, window,
			   bpf_htons(rescale_window(bpf_ntohs(window), x->wscale_in, x->wscale_out)), 2);
}

/* Count the packet and the FIN/RST it carries in the entry (shared across CPUs). */
static __always_inline void account(struct flow_entry *e, struct __sk_buff *skb, __u8 tcp_flags)
{
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, skb->len);
	e->last_seen_ns = bpf_ktime_get_ns();
	if (tcp_flags & TCPF_FIN)
		__sync_fetch_and_or(&e->flags, FLOW_F_FIN);
	if (tcp_flags & TCPF_RST)
		__sync_fetch_and_or(&e->flags, FLOW_F_RST);
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

#endif /* ARR_HANDOFF_H */
