/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * arr handoff: what the router and target programs share, laid out by role
 * as Katran's lib/bpf is:
 *
 *   arr_consts.h   sizes, flags, TCP constants (named once, mirrored by handoff/maps.py)
 *   arr_structs.h  map keys and values, the event record, working structures
 *   arr_maps.h     the maps (shared ones, and each role's connection maps)
 *   arr_parse.h    header parsing, sequence arithmetic, the TCP option walker
 *   arr_rewrite.h  the translation, checksums, accounting and events, delivery
 *
 * The rewrite is the blueprint's section 3 table; the Python reference model
 * is handoff/translate.py and handoff/packet.py, and the two must agree
 * packet for packet.
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

#include "arr_consts.h"
#include "arr_structs.h"
#include "arr_maps.h"
#include "arr_parse.h"
#include "arr_rewrite.h"

#endif /* ARR_HANDOFF_H */
