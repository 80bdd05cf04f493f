"""Map access through the compiled accelerator (handoff/_fastpath.c) against
libbpf's, on real maps of the router object (root; nothing attached).

BpfMap.lookup/update/delete take the compiled path when it is built (it must
be, here); the *_libbpf methods are the reference. Every value written one way
must read back byte for byte the other way, and the errors must be the same.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator

import pytest

from handoff import fastpath
from handoff.build import object_path
from handoff.libbpf import BPF_NOEXIST, BpfError, BpfMap, BpfObject
from handoff.maps import FlowEntry, FlowKey, WatchEntry, Xlate
from handoff.translate import Translation

pytestmark = pytest.mark.bpf

CAPACITY = 64


@pytest.fixture
def maps() -> Iterator[tuple[BpfMap, BpfMap]]:
    """(ingress, watch) of a freshly loaded router object with small maps."""
    assert fastpath.COMPILED, "handoff._fastpath is not built: run scripts/setup.sh"
    obj = BpfObject(object_path("router"), capacity={"arr_ingress": CAPACITY, "arr_watch": CAPACITY})
    try:
        yield (BpfMap(obj.map_fd("arr_ingress"), FlowKey, FlowEntry),
               BpfMap(obj.map_fd("arr_watch"), FlowKey, WatchEntry))
    finally:
        obj.close()


def key(i: int) -> FlowKey:
    return FlowKey.of((f"10.1.{i // 250}.{i % 250 + 1}", 40000 + i), ("10.0.0.1", 80))


def flow_entry(rng: random.Random) -> FlowEntry:
    x = Translation(saddr="10.0.0.2", daddr="10.0.0.11", sport=rng.randrange(50000, 61000), dport=8080,
                    seq_delta=rng.randrange(1 << 32), ack_delta=rng.randrange(1 << 32),
                    tsval_delta=rng.randrange(1 << 32), tsecr_delta=rng.randrange(1 << 32),
                    wscale_in=rng.randrange(15), wscale_out=rng.randrange(15))
    return FlowEntry(x=Xlate.of(x), state=rng.randrange(1, 4), created_ns=rng.randrange(1 << 63),
                     syn_seq=rng.randrange(1 << 32), seq_next=rng.randrange(1 << 32),
                     conn_id=rng.randrange(1 << 63))


def test_values_written_by_one_path_read_back_exactly_by_the_other(maps) -> None:
    ingress, _ = maps
    rng = random.Random(7)
    written = {}
    for i in range(40):
        entry = flow_entry(rng)
        (ingress.update if i % 2 else ingress.update_libbpf)(key(i), entry)
        written[i] = bytes(entry)
    for i, raw in written.items():
        assert bytes(ingress.lookup(key(i))) == raw
        assert bytes(ingress.lookup_libbpf(key(i))) == raw
    assert ingress.lookup(key(1000)) is None and ingress.lookup_libbpf(key(1000)) is None


def test_watch_entries_round_trip(maps) -> None:
    _, watch = maps
    entry = WatchEntry(state=2, client_mss=1400, client_sack=1, client_ts=1, target_tsval=0xFFFFFFFF,
                       rcv_nxt=123456789, closed_ns=1 << 62, conn_id=(1 << 64) - 1)
    watch.update(key(1), entry)
    assert bytes(watch.lookup_libbpf(key(1))) == bytes(entry)


def test_delete_and_flags_behave_like_libbpf(maps) -> None:
    ingress, _ = maps
    entry = flow_entry(random.Random(1))
    ingress.update(key(1), entry)
    with pytest.raises(BpfError) as compiled:
        ingress.update(key(1), entry, BPF_NOEXIST)
    with pytest.raises(BpfError) as reference:
        ingress.update_libbpf(key(1), entry, BPF_NOEXIST)
    assert compiled.value.errno == reference.value.errno == errno.EEXIST
    assert ingress.delete(key(1)) is True
    assert ingress.delete(key(1)) is False and ingress.delete_libbpf(key(1)) is False
    ingress.update_libbpf(key(2), entry)
    assert ingress.delete(key(2)) is True and ingress.lookup_libbpf(key(2)) is None


def test_a_full_map_refuses_the_same_way(maps) -> None:
    ingress, _ = maps
    entry = flow_entry(random.Random(2))
    for i in range(CAPACITY):
        ingress.update(key(i), entry)
    with pytest.raises(BpfError) as compiled:
        ingress.update(key(CAPACITY), entry)
    with pytest.raises(BpfError) as reference:
        ingress.update_libbpf(key(CAPACITY), entry)
    assert compiled.value.errno == reference.value.errno == errno.E2BIG
    assert len(ingress.keys()) == CAPACITY
