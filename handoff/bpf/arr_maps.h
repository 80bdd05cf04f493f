/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * arr handoff: the maps (each object has its own instances), and the two
 * helpers that write to the shared ones: count() and emit().
 */
#ifndef ARR_MAPS_H
#define ARR_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "arr_structs.h"

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

/* ------------------------------------------------------------------ events */

/* What userspace must look at, as it happens: the lifecycle is driven by these
 * instead of periodic walks of every entry (handoff/lifecycle.py,
 * handoff/agent_lifecycle.py). An event is a hint: userspace checks the truth
 * (the maps, the target's kernel); a lost one is found by the slow sweep. */
/* Each object has its own instance of this map too. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, ARR_EVENTS_BYTES);
} arr_events SEC(".maps");

static __always_inline void emit(const struct flow_key *key, __u32 kind, __u64 conn_id)
{
	struct arr_event ev = {};

	ev.key = *key;
	ev.kind = kind;
	ev.conn_id = conn_id;
	if (bpf_ringbuf_output(&arr_events, &ev, sizeof(ev), 0) < 0)
		count(STAT_EVENTS_LOST);
}

/* ------------------------------------------------------ connections */

/* The connection maps of each role; a program source defines ARR_ROLE_ROUTER
 * or ARR_ROLE_TARGET before it includes arr_handoff.h. Sized
 * ARR_DEFAULT_CAPACITY unless the loader sets another size. */
#ifdef ARR_ROLE_ROUTER
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ARR_DEFAULT_CAPACITY);
	__type(key, struct flow_key);
	__type(value, struct flow_entry);
} arr_ingress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ARR_DEFAULT_CAPACITY);
	__type(key, struct flow_key);
	__type(value, struct watch_entry);
} arr_watch SEC(".maps");
#endif

#ifdef ARR_ROLE_TARGET
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ARR_DEFAULT_CAPACITY);
	__type(key, struct flow_key);
	__type(value, struct flow_entry);
} arr_egress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ARR_DEFAULT_CAPACITY);
	__type(key, struct flow_key);
	__type(value, struct mirror_state);
} arr_mirror SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ARR_DEFAULT_CAPACITY);
	__type(key, struct flow_key);
	__type(value, struct response_head);
} arr_response SEC(".maps");

/* A blank response_head to insert from: the value is larger than the stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct response_head);
} arr_response_blank SEC(".maps");
#endif

#endif /* ARR_MAPS_H */
