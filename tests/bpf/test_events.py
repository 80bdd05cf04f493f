"""The programs' reports (arr_events ring buffer) agree with the model
(handoff/packet.py ``entry_event``): the lifecycle is driven by them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from handoff import packet
from handoff.libbpf import RingBuffer
from handoff.maps import EV_NEW_SYN, FLOW_F_FIN, FLOW_F_RST, Event, FlowEntry

from test_bpf_properties import FEW, NOT_SYN, active, frames, key_of, translations, u32

pytestmark = pytest.mark.bpf

CASES = [("arr_router_ingress", "router", "arr_ingress", packet.ROUTER_EVENTS),
         ("arr_target_egress", "target", "arr_egress", packet.TARGET_EVENTS)]


@pytest.fixture(scope="module")
def rings(bpf_env):
    made = {name: bpf_env.call(lambda n=name: RingBuffer(bpf_env.objects[n].obj.map_fd("arr_events"), Event))
            for name in ("router", "target")}
    yield made
    for ring in made.values():
        ring.close()


@pytest.mark.parametrize("program, obj, table, reported", CASES)
@settings(FEW, max_examples=80)
@given(data=st.data())
def test_rewritten_packets_report_what_the_model_says(bpf_env, rings, program, obj, table, reported, data):
    frame = data.draw(frames(flags=NOT_SYN))
    key = key_of(frame)
    entry = active(data.draw(translations()))
    entry.flags = data.draw(st.sampled_from([0, FLOW_F_FIN, FLOW_F_RST, FLOW_F_FIN | FLOW_F_RST]))
    entry.conn_id = data.draw(st.integers(1, 1 << 63))
    rings[obj].consume()
    run = bpf_env.run(program, frame, {table: {key: entry}})
    if run.stats.get("out_of_window") or run.stats.get("rewrite_failed"):
        return  # not accounted: no report either
    events = [(bytes(e.key), e.kind, e.conn_id) for e in rings[obj].consume()]
    kind = packet.entry_event(frame, entry.flags, reported)
    assert events == ([] if kind is None else [(bytes(key), kind, entry.conn_id)])


@pytest.mark.parametrize("program, obj, table, reported", CASES)
@settings(FEW, max_examples=20)
@given(data=st.data())
def test_a_syn_that_ends_an_entry_is_reported(bpf_env, rings, program, obj, table, reported, data):
    frame = data.draw(frames(flags=st.sampled_from(["S", "SA"])))
    key = key_of(frame)
    entry = active(data.draw(translations()))
    entry.syn_seq = data.draw(u32)
    entry.conn_id = 77
    rings[obj].consume()
    run = bpf_env.run(program, frame, {table: {key: entry}})
    events = [(bytes(e.key), e.kind, e.conn_id) for e in rings[obj].consume()]
    ended = run.stats.get("ended_by_syn", 0) == 1
    assert events == ([(bytes(key), EV_NEW_SYN, 77)] if ended else [])
