/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * arr handoff: constants (Katran's lib/bpf layout: constants, structs, maps,
 * parsing and rewrite helpers in headers of their own; arr_handoff.h includes
 * them all). Numbers userspace shares (capacity, ring buffer size, mirror
 * tail, event kinds, flags) are named here once; handoff/maps.py mirrors them
 * and tests/unit/test_bpf_layout.py checks that the two agree.
 */
#ifndef ARR_CONSTS_H
#define ARR_CONSTS_H

#include <linux/types.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* ------------------------------------------------------------ sizes */

/* Entries a connection map holds unless the loader sets another size
 * (handoff/datapath.py, from the capacity setting). Plain hash maps, not LRU:
 * a full map refuses new handoffs (they fall back) and never evicts a live
 * connection's entry. */
#define ARR_DEFAULT_CAPACITY 65536

#define ARR_EVENTS_BYTES (1024 * 1024) /* the events ring buffer: 32,768 events (24 bytes + 8 of
					* header), or 480 captures */

/* A taken-back segment's payload goes to userspace in pieces of this size
 * (struct arr_capture), at most ARR_CAPTURE_CHUNKS of them (64 KiB: a GSO
 * segment); what does not fit the client sends again. */
#define ARR_CAPTURE_CHUNK 2048
#define ARR_CAPTURE_CHUNKS 32

#define ARR_HEAD_BYTES 512 /* target: bytes of a response's start kept for the agent, which reads
			    * its framing from them (struct response_head); nginx's head for a
			    * static file is about 260 */
#define ARR_TAIL_BYTES 8 /* target: the last bytes sent of a response, kept with its start
			 * (response_head.tail, a __u64) */
#define ARR_MIRROR_TAIL_ACKS 8
#define ARR_MIRROR_TAIL_NS (4ULL * 1000 * 1000 * 1000) /* the router's RTOs 0.2+0.4+0.8+1.6 s */

/* ------------------------------------------------------------ flags */

/* flow_entry.flags, set by the programs (atomically), read by userspace. */
#define FLOW_F_FIN (1U << 0)     /* a FIN went through in this entry's direction */
#define FLOW_F_RST (1U << 1)     /* a RST went through in this entry's direction */
#define FLOW_F_NEW_SYN (1U << 2) /* ended: a SYN of a new connection on the same 4-tuple */
#define FLOW_F_SENT (1U << 3)    /* target: snd_max holds what the server sent (any value, 0 too) */
/* router, set by userspace while it takes a connection back on its own
 * initiative (handoff/migrate.py): the client's next pure ACK (its answer to
 * the router's probe) goes to userspace as a header-only capture; cleared by
 * the program when it does. */
#define FLOW_F_WANT_HEADER (1U << 4)
#define FLOW_F_ACKED (1U << 5)   /* target: peer_ack holds the server's highest ack */

/* The largest window TCP can announce (65535 << 14): a segment further than
 * this from what the connection has sent so far cannot belong to it. */
#define SEQ_WINDOW_MAX (1U << 30)

#define WATCH_OPT_SACK 1
#define WATCH_OPT_TS 2
#define WATCH_OPT_WSCALE 4

/* Which kinds a program reports (account's mask). */
#define ARR_EVM_FIN (1U << ARR_EV_FIN)
#define ARR_EVM_RST (1U << ARR_EV_RST)
#define ARR_EVM_AFTER_FIN (1U << ARR_EV_AFTER_FIN)

#define ARR_MIRROR_MARK 0x0a770001 /* a clone on its way to the router: let it pass */

/* ------------------------------------------------------------- TCP */

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

#endif /* ARR_CONSTS_H */
