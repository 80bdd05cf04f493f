"""The BPF programs against the reference model, through BPF_PROG_TEST_RUN.

Crafted packets (scapy) run through the real, verifier-checked programs in a
throw-away namespace (so the FIB lookup is deterministic); the rewritten
bytes must equal what handoff.translate predicts, checksums included.
"""

from __future__ import annotations

import dataclasses

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from arr import netlink
from handoff.build import object_path
from handoff.libbpf import BpfMap, BpfObject, test_run
from handoff.maps import (FLOW_ACTIVE, FLOW_HOLD, WATCH_CLOSED, WATCH_CONNECTING, WATCH_HANDED_OFF,
                          FlowEntry, FlowKey, MirrorState, WatchEntry, Xlate)
from handoff.translate import TcpFields, Translation, translate_fields

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7


def eth() -> Ether:
    """Explicit MACs: a bare Ether() makes scapy resolve one (ARP), never wanted here."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

pytestmark = pytest.mark.bpf
# bpf_ns (the namespace and x0's ifindex) comes from conftest.py.


def in_ns(ns: str, fn):
    return netlink.run_in_netns(ns, fn)


def skb_ctx(ifindex: int) -> bytes:
    """A struct __sk_buff for test_run with only ifindex set (offset 40)."""
    ctx = bytearray(192)
    ctx[40:44] = ifindex.to_bytes(4, "little")
    return bytes(ctx)


TO_CLIENT = Translation(saddr="10.9.0.100", daddr="10.9.0.2", sport=80, dport=40000,
                        seq_delta=(1 << 32) - 1000, ack_delta=123456, tsval_delta=777,
                        tsecr_delta=4_000_000_000, wscale_in=7, wscale_out=9)
FWD = (("10.9.0.11", 8080), ("10.9.0.1", 50123))  # target -> router


def model(pkt: Ether, x: Translation) -> bytes:
    """The packet the reference model predicts, checksums recomputed by scapy."""
    ip, tcp = pkt[IP], pkt[TCP]
    opts = dict((k, v) for k, v in tcp.options if isinstance(k, str))
    ts = opts.get("Timestamp")
    fields = TcpFields(ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.window,
                       ts[0] if ts else None, ts[1] if ts else None, tuple(
                           zip(opts["SAck"][::2], opts["SAck"][1::2])) if "SAck" in opts else ())
    out = translate_fields(fields, x)
    new = pkt.copy()
    new[IP].src, new[IP].dst = out.saddr, out.daddr
    new[TCP].sport, new[TCP].dport = out.sport, out.dport
    new[TCP].seq, new[TCP].ack, new[TCP].window = out.seq, out.ack, out.window
    options = []
    for kind, value in tcp.options:
        if kind == "Timestamp":
            value = (out.tsval, out.tsecr)
        elif kind == "SAck":
            value = tuple(edge for block in out.sack for edge in block)
        options.append((kind, value))
    new[TCP].options = options
    del new[IP].chksum, new[TCP].chksum
    return bytes(new)


def run_target(ns: str, ifindex: int, pkt: Ether, x: Translation, *, flags: int = 0,
               state: int = FLOW_ACTIVE) -> tuple[int, bytes, FlowEntry]:
    def body():
        with BpfObject(object_path("target")) as obj:
            egress = BpfMap(obj.map_fd("arr_egress"), FlowKey, FlowEntry)
            key = FlowKey.of(*FWD)
            egress.update(key, FlowEntry(x=Xlate.of(x), state=state, flags=flags))
            verdict, out = test_run(obj.program_fd("arr_target_egress"), bytes(pkt),
                                    ctx=skb_ctx(ifindex))
            return verdict, out, egress.lookup(key)
    return in_ns(ns, body)


def target_packet(**tcp) -> Ether:
    defaults = dict(sport=FWD[0][1], dport=FWD[1][1], flags="A", seq=4_294_967_000, ack=1000,
                    window=1000, options=[("NOP", None), ("NOP", None), ("Timestamp", (5000, 99))])
    defaults.update(tcp)
    return eth() / IP(src=FWD[0][0], dst=FWD[1][0], id=7) / TCP(**defaults) / (b"r" * 100)


def same_but_macs(a: bytes, b: bytes) -> bool:
    return a[12:] == b[12:]


def test_target_egress_rewrites_exactly_like_the_model(bpf_ns):
    ns, ifindex = bpf_ns
    pkt = target_packet()
    verdict, out, entry = run_target(ns, ifindex, pkt, TO_CLIENT)
    assert verdict == TC_ACT_REDIRECT  # no neighbour yet: bpf_redirect_neigh
    expected = model(pkt, TO_CLIENT)
    assert same_but_macs(out, expected), (Ether(out).show(dump=True), Ether(expected).show(dump=True))
    assert (entry.packets, entry.bytes) == (1, len(bytes(pkt)))


@pytest.mark.parametrize("options", [
    [("Timestamp", (1, 2))],  # TS at an odd-aligned offset (no NOP padding)
    [("NOP", None), ("NOP", None), ("Timestamp", (0xFFFFFFFF, 0)),
     ("NOP", None), ("NOP", None), ("SAck", (100, 200, 4_294_967_290, 10))],
    [("SAck", (1, 2, 3, 4, 5, 6, 7, 8)), ("NOP", None), ("NOP", None)],
    [],
])
def test_target_egress_options(bpf_ns, options):
    ns, ifindex = bpf_ns
    pkt = target_packet(options=options)
    verdict, out, _ = run_target(ns, ifindex, pkt, TO_CLIENT)
    assert verdict == TC_ACT_REDIRECT
    assert same_but_macs(out, model(pkt, TO_CLIENT))


def test_target_egress_ignores_other_flows_and_marks_fin_rst(bpf_ns):
    ns, ifindex = bpf_ns
    other = target_packet(sport=9999)
    verdict, out, entry = run_target(ns, ifindex, other, TO_CLIENT)
    assert (verdict, out) == (TC_ACT_OK, bytes(other)) and entry.packets == 0
    _, _, entry = run_target(ns, ifindex, target_packet(flags="FA"), TO_CLIENT)
    assert entry.flags & 1
    _, _, entry = run_target(ns, ifindex, target_packet(flags="R"), TO_CLIENT)
    assert entry.flags & 2


def test_window_never_rounds_to_zero(bpf_ns):
    ns, ifindex = bpf_ns
    x = dataclasses.replace(TO_CLIENT, wscale_in=0, wscale_out=14)
    pkt = target_packet(window=5)
    _, out, _ = run_target(ns, ifindex, pkt, x)
    assert Ether(out)[TCP].window == 1
    assert same_but_macs(out, model(pkt, x))


TO_TARGET = Translation(saddr="10.9.0.1", daddr="10.9.0.11", sport=50123, dport=8080,
                        seq_delta=99, ack_delta=(1 << 32) - 1000, tsval_delta=1 << 20,
                        tsecr_delta=777, wscale_in=9, wscale_out=7)
CLIENT = (("10.9.0.2", 40000), ("10.9.0.100", 80))


def run_router(ns, ifindex, pkt, *, ingress=None, watch=None, program="arr_router_ingress"):
    def body():
        with BpfObject(object_path("router")) as obj:
            ingress_map = BpfMap(obj.map_fd("arr_ingress"), FlowKey, FlowEntry)
            watch_map = BpfMap(obj.map_fd("arr_watch"), FlowKey, WatchEntry)
            for key, value in (ingress or {}).items():
                ingress_map.update(key, value)
            for key, value in (watch or {}).items():
                watch_map.update(key, value)
            verdict, out = test_run(obj.program_fd(program), bytes(pkt), ctx=skb_ctx(ifindex))
            return verdict, out, dict(ingress_map.items()), dict(watch_map.items())
    return in_ns(ns, body)


def client_packet(**tcp) -> Ether:
    defaults = dict(sport=40000, dport=80, flags="A", seq=10, ack=20, window=300,
                    options=[("NOP", None), ("NOP", None), ("Timestamp", (123, 456))])
    defaults.update(tcp)
    return eth() / IP(src="10.9.0.2", dst="10.9.0.100") / TCP(**defaults)


def test_router_ingress_rewrites_client_packets_like_the_model(bpf_ns):
    ns, ifindex = bpf_ns
    key = FlowKey.of(*CLIENT)
    pkt = client_packet(options=[("NOP", None), ("NOP", None), ("Timestamp", (123, 456)),
                                 ("NOP", None), ("NOP", None), ("SAck", (30, 40))])
    verdict, out, entries, _ = run_router(
        ns, ifindex, pkt, ingress={key: FlowEntry(x=Xlate.of(TO_TARGET), state=FLOW_ACTIVE)})
    assert verdict == TC_ACT_REDIRECT
    assert same_but_macs(out, model(pkt, TO_TARGET))
    assert entries[key].packets == 1


def test_router_ingress_holds_while_state_is_read(bpf_ns):
    ns, ifindex = bpf_ns
    key = FlowKey.of(*CLIENT)
    verdict, out, _, _ = run_router(ns, ifindex, client_packet(),
                                    ingress={key: FlowEntry(x=Xlate.of(TO_TARGET), state=FLOW_HOLD)})
    assert verdict == TC_ACT_SHOT


def test_router_records_the_targets_synack(bpf_ns):
    ns, ifindex = bpf_ns
    key = FlowKey.of(*FWD)
    synack = eth() / IP(src=FWD[0][0], dst=FWD[1][0]) / TCP(
        sport=FWD[0][1], dport=FWD[1][1], flags="SA", seq=5, ack=6,
        options=[("MSS", 1400), ("SAckOK", b""), ("Timestamp", (31337, 1)), ("NOP", None),
                 ("WScale", 9)])
    verdict, out, _, watch = run_router(ns, ifindex, synack,
                                        watch={key: WatchEntry(state=WATCH_CONNECTING)})
    assert (verdict, out) == (TC_ACT_OK, bytes(synack))
    w = watch[key]
    assert (w.target_tsval, w.synack_mss, w.synack_wscale, w.synack_opts) == (31337, 1400, 9, 1 | 2 | 4)


@pytest.mark.parametrize("flags, recorded", [("FA", 90001), ("A", 0), ("F", 0)])
def test_router_records_the_ack_of_the_targets_fin(bpf_ns, flags, recorded):
    # handoff/forward_close.py: a FIN acknowledging the router's proves TIME_WAIT.
    ns, ifindex = bpf_ns
    key = FlowKey.of(*FWD)
    segment = eth() / IP(src=FWD[0][0], dst=FWD[1][0]) / TCP(
        sport=FWD[0][1], dport=FWD[1][1], flags=flags, seq=5, ack=90001,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (31337, 1))])
    verdict, out, _, watch = run_router(ns, ifindex, segment, watch={key: WatchEntry(state=WATCH_CONNECTING)})
    assert (verdict, out) == (TC_ACT_OK, bytes(segment))  # passed to the stack untouched
    assert (watch[key].target_fin_ack, watch[key].target_tsval) == (recorded, 31337)


def test_router_egress_normalises_its_syn(bpf_ns):
    ns, ifindex = bpf_ns
    key = FlowKey.of(*FWD)
    syn = eth() / IP(src=FWD[1][0], dst=FWD[0][0]) / TCP(
        sport=FWD[1][1], dport=FWD[0][1], flags="S", seq=5,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)])
    verdict, out, _, _ = run_router(
        ns, ifindex, syn, program="arr_router_egress",
        watch={key: WatchEntry(state=WATCH_CONNECTING, client_mss=1360, client_sack=0, client_ts=0)})
    got = Ether(out)
    assert verdict == TC_ACT_OK
    kinds = [k for k, _ in got[TCP].options]
    assert ("MSS", 1360) in got[TCP].options and "SAckOK" not in kinds and "Timestamp" not in kinds
    assert ("WScale", 7) in got[TCP].options
    check = got[TCP].chksum
    del got[TCP].chksum
    assert Ether(bytes(got))[TCP].chksum == check


def test_router_trims_mirrored_copies_to_pure_acks(bpf_ns):
    ns, ifindex = bpf_ns
    key = FlowKey.of(*FWD)
    clone = target_packet(flags="PA", ack=777)
    verdict, out, _, watch = run_router(
        ns, ifindex, clone, watch={key: WatchEntry(state=WATCH_HANDED_OFF, rcv_nxt=424242)})
    got = Ether(out)
    assert verdict == TC_ACT_OK
    assert len(got[TCP].payload) == 0 and got[IP].len == 20 + len(bytes(got[TCP]))
    assert (got[TCP].seq, got[TCP].ack, str(got[TCP].flags)) == (424242, 777, "A")
    check, ipcheck = got[TCP].chksum, got[IP].chksum
    del got[TCP].chksum, got[IP].chksum
    again = Ether(bytes(got))
    assert (again[TCP].chksum, again[IP].chksum) == (check, ipcheck)
    assert watch[key].mirrored == 1


def test_router_lowers_a_mirrored_ack_past_its_request(bpf_ns):
    """The target's ACK of the client's FIN (translated: one past the
    router's request) reaches the router's forwarding socket as an ACK of the
    request exactly; Linux would answer an ack of unsent data with a
    challenge ACK in the socket's own clock, PAWS-old at the target."""
    ns, ifindex = bpf_ns
    key = FlowKey.of(*FWD)
    for ack, request_end, seen in ((5001, 5000, 5000), (5000, 5000, 5000), (4990, 5000, 4990),
                                   (3, 2**32 - 2, 2**32 - 2), (7000, 0, 7000)):
        clone = target_packet(flags="A", ack=ack)
        verdict, out, _, _ = run_router(
            ns, ifindex, clone, watch={key: WatchEntry(state=WATCH_HANDED_OFF, rcv_nxt=424242,
                                                       request_end=request_end)})
        got = Ether(out)
        assert verdict == TC_ACT_OK
        assert (got[TCP].seq, got[TCP].ack) == (424242, seen), (ack, request_end)
        check = got[TCP].chksum
        del got[TCP].chksum
        assert Ether(bytes(got))[TCP].chksum == check


def test_target_mirrors_request_acks_once_per_advance(bpf_ns):
    ns, ifindex = bpf_ns
    # Mirroring clones with bpf_clone_redirect; under test_run the clone goes
    # to the veth inside this namespace, so nothing leaves it.
    x = TO_CLIENT
    pkt = target_packet(ack=2000)

    def body():
        with BpfObject(object_path("target")) as obj:
            egress = BpfMap(obj.map_fd("arr_egress"), FlowKey, FlowEntry)
            mirror = BpfMap(obj.map_fd("arr_mirror"), FlowKey, MirrorState)
            stats = obj.map_fd("arr_stats")
            key = FlowKey.of(*FWD)
            egress.update(key, FlowEntry(x=Xlate.of(x), state=FLOW_ACTIVE))
            mirror.update(key, MirrorState(mirror_until=2000, mirrored_ack=1000))
            prog = obj.program_fd("arr_target_egress")
            first = test_run(prog, bytes(pkt), ctx=skb_ctx(ifindex))
            after_first = mirror.lookup(key).mirrored_ack
            second = test_run(prog, bytes(pkt), ctx=skb_ctx(ifindex))
            from handoff.datapath import read_stats
            from handoff.libbpf import BpfMap as Map
            from handoff.maps import StatIndex
            counted = read_stats(Map(stats, StatIndex, StatIndex))["mirrored"]
            return first, after_first, second, counted
    (v1, out1), mirrored_ack, (v2, out2), mirrored = in_ns(ns, body)
    assert mirrored_ack == 2000
    assert mirrored == 1  # the second packet acknowledges nothing new and carries data
    assert v1 == v2 == TC_ACT_REDIRECT
    assert same_but_macs(out1, model(pkt, x)) and same_but_macs(out2, model(pkt, x))


def test_router_drops_target_packets_after_the_silent_close(bpf_ns):
    ns, ifindex = bpf_ns
    key = FlowKey.of(*FWD)
    verdict, _, _, _ = run_router(ns, ifindex, target_packet(),
                                  watch={key: WatchEntry(state=WATCH_CLOSED)})
    assert verdict == TC_ACT_SHOT
