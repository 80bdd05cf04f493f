"""The control channel under attack, on a real cluster (issue 13's acceptance).

A real router's HELLO and PROOF are captured off the wire in the target's
namespace (AF_PACKET), then replayed from the client's namespace, alone, 50
times in a row, 1,000 at once and as a whole recorded handshake; sessions that
never read, oversize and stalled length prefixes, silent connections and an
authenticated router that never reads are held meanwhile. Every one is
refused or dropped and counted by reason; the agent's file descriptors and
memory stay bounded; and the real router's handoffs to that agent go on
unaffected: every body's SHA-256 checked, every request a handoff, no
fallback, latency within noise of a baseline measured before.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import struct
import threading
import time
from collections import Counter
from typing import Any

import pytest

from arr import netlink
from arr.testbed import Cluster
from arr.testbed.router import AGENT_PORT, handoff_cluster, secret_file, wait_for
from handoff.control import ControlConnection, MessageType, Ping, load_psk

pytestmark = pytest.mark.net

KiB = 1 << 10
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
HANDSHAKE_TIMEOUT = 2.0
SEND_TIMEOUT = 2.0
REQUESTS = 60


# ------------------------------------------------------------------ the wiretap


class ControlWiretap:
    """What the router sends to the agent's control port, as seen by an
    AF_PACKET socket in the target's namespace: payload by router port and
    sequence number (a background thread reads; ``close`` stops it)."""

    def __init__(self, ns: str, router_ip: str) -> None:
        self.router_ip = socket.inet_aton(router_ip)
        self.sock = netlink.socket_in_netns(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.settimeout(0.1)
        self.segments: dict[int, dict[int, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="control-wiretap", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                packet, address = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            if address[2] == PACKET_OUTGOING or packet[12:14] != b"\x08\x00":
                continue
            ip = packet[14:]
            ihl = (ip[0] & 0x0F) * 4
            (total,) = struct.unpack_from(">H", ip, 2)
            if ip[9] != socket.IPPROTO_TCP or ip[12:16] != self.router_ip:
                continue
            tcp = ip[ihl:total]
            sport, dport, seq = struct.unpack_from(">HHI", tcp)
            payload = tcp[(tcp[12] >> 4) * 4:]
            if dport == AGENT_PORT and payload:
                self.segments.setdefault(sport, {})[seq] = payload

    def handshake(self) -> tuple[bytes, bytes] | None:
        """The HELLO and PROOF frames of a captured new connection, if any."""
        for segments in list(self.segments.values()):
            stream = b""
            for seq in sorted(segments):
                stream += segments[seq]
            frames = split_frames(stream)
            if len(frames) >= 2 and frames[0][5] == MessageType.HELLO and frames[1][5] == MessageType.PROOF:
                return frames[0], frames[1]
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def split_frames(stream: bytes) -> list[bytes]:
    frames = []
    while len(stream) >= 4:
        (length,) = struct.unpack_from(">I", stream)
        if len(stream) < 4 + length:
            break
        frames.append(stream[:4 + length])
        stream = stream[4 + length:]
    return frames


# ------------------------------------------------------------------ the attacker

TCP_ESTABLISHED = 1


def tcp_state(sock: Any) -> int | None:
    """The kernel's TCP state of SOCK (TCP_INFO's first byte): it tells that
    the peer closed or reset without reading a byte. None once unusable."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return None



class Attacker(threading.Thread):
    """An asyncio attacker in the client's namespace (its own thread, joined
    to the namespace for good, so that every socket it opens is the client's).
    Runs until ``stop`` is set; records everything it got back."""

    def __init__(self, cluster: Cluster, hello: bytes, proof: bytes, psk: bytes) -> None:
        super().__init__(name="control-attacker", daemon=True)
        self.ns = cluster.client.ns
        self.agent = (cluster.targets[0].ip, AGENT_PORT)
        self.hello, self.proof, self.psk = hello, proof, psk
        self.stop = threading.Event()
        self.phase_done = threading.Event()
        self.received: list[bytes] = []
        """Bytes each unproven connection got before it was closed."""
        self.lifetimes: dict[str, list[float]] = {}
        self.errors: Counter[str] = Counter()
        self.flood_sent = 0
        self.flood_cut_after: float | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            netlink.join_netns(self.ns)
            asyncio.run(self.main())
        except BaseException as exc:  # reported by the test
            self.failure = exc

    async def connect(self, rcvbuf: int | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, socket.socket]:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.agent), 10)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        return reader, writer, sock

    async def probe(self, kind: str, data: bytes, *, rcvbuf: int | None = None, read: bool = True) -> None:
        """Connect, send DATA, and read (or not) until the agent closes."""
        started = time.monotonic()
        try:
            reader, writer, sock = await self.connect(rcvbuf)
        except (OSError, asyncio.TimeoutError) as exc:
            self.errors[f"{kind}: connect {type(exc).__name__}"] += 1
            return
        got = b""
        try:
            if data:
                writer.write(data)
            if read:
                got = await asyncio.wait_for(reader.read(), 30)
            else:  # never read: the kernel's TCP state says when the agent ended it
                writer.transport.pause_reading()
                while time.monotonic() - started < 30 and tcp_state(sock) == TCP_ESTABLISHED:
                    await asyncio.sleep(0.02)
                try:
                    got = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # what the kernel holds for us
                except (BlockingIOError, ConnectionResetError):
                    got = b""
        except ConnectionResetError:
            pass  # refused at the accept (a RST): nothing received
        except (OSError, asyncio.TimeoutError) as exc:
            self.errors[f"{kind}: {type(exc).__name__}"] += 1
        finally:
            writer.close()
        self.received.append(got)
        self.lifetimes.setdefault(kind, []).append(time.monotonic() - started)

    async def hold(self, kind: str, data: bytes, **kwargs: Any) -> None:
        """Keep one such connection open, reopening it whenever the agent cuts it."""
        while not self.stop.is_set():
            await self.probe(kind, data, **kwargs)

    async def authenticated_non_reader(self) -> None:
        """A router with the key that stops reading and keeps asking (PINGs):
        the agent must drop it, not queue for it."""
        reader, writer, sock = await self.connect(rcvbuf=1024)
        conn = ControlConnection("client", self.psk, "router-stuck")
        writer.write(conn.start())
        while not conn.established:
            conn.receive_data(await asyncio.wait_for(reader.read(4096), 5))
        writer.write(conn.data_to_send())
        writer.transport.pause_reading()  # from now on, not a byte taken
        started = time.monotonic()
        token = 0
        try:
            while not self.stop.is_set() and time.monotonic() - started < 30:
                for _ in range(50):  # 10,000 PINGs a second, replies never taken
                    token += 1
                    writer.write(conn.send(Ping(token)))
                await writer.drain()
                self.flood_sent = token
                await asyncio.sleep(0.005)
                if tcp_state(sock) != TCP_ESTABLISHED:
                    break
        except (ConnectionError, OSError):
            pass
        self.flood_cut_after = time.monotonic() - started
        writer.close()

    async def main(self) -> None:
        # The whole recorded handshake, to an agent that never saw it.
        await self.probe("whole-handshake", self.hello + self.proof)
        await self.probe("oversize", struct.pack(">I", 65531))
        for _ in range(50):
            await self.probe("replay", self.hello)
        await asyncio.gather(*(self.probe("replay-burst", self.hello) for _ in range(1000)))
        self.phase_done.set()
        loop = asyncio.get_running_loop()
        held = [loop.create_task(self.hold("stalled-prefix", struct.pack(">I", 200))),
                loop.create_task(self.hold("silent", b"")),
                loop.create_task(self.hold("replay-non-reader", self.hello, rcvbuf=1024, read=False)),
                loop.create_task(self.authenticated_non_reader())]
        while not self.stop.is_set():
            await asyncio.sleep(0.05)
        await asyncio.gather(*held, return_exceptions=True)


# ------------------------------------------------------------------ the agent's resources


class ResourceSampler(threading.Thread):
    """Peak file descriptors and RSS of a process, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="agent-sampler", daemon=True)
        self.pid = pid
        self.peak_fds = 0
        self.peak_rss = 0
        self.stop = threading.Event()

    def sample(self) -> tuple[int, int]:
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        with open(f"/proc/{self.pid}/status") as status:
            rss = next(int(line.split()[1]) * KiB for line in status if line.startswith("VmRSS:"))
        return fds, rss

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                fds, rss = self.sample()
            except (OSError, StopIteration):
                return
            self.peak_fds, self.peak_rss = max(self.peak_fds, fds), max(self.peak_rss, rss)
            time.sleep(0.02)


def rejected(agent) -> dict[str, float]:
    prefix = 'arr_agent_control_rejected_total{reason="'
    return {key[len(prefix):-2]: value for key, value in agent.metrics().items() if key.startswith(prefix)}


def timed_requests(c: Cluster, router, info, n: int) -> list[float]:
    times = []
    for _ in range(n):
        result = c.curl(router.url + info.url_path)
        assert result.status == 200 and result.sha256 == info.sha256, result
        times.append(result.time_total)
    return times


# ------------------------------------------------------------------ the test


def test_attacks_on_the_control_channel_are_refused_and_handoffs_go_on(cluster):
    c = cluster(targets=1, files={"64k": 64 * KiB})
    info = c.files["64k"]
    psk = load_psk(secret_file(c))
    attacker: Attacker | None = None
    sampler: ResourceSampler | None = None
    wiretap: ControlWiretap | None = None
    settings = {"control_handshake_timeout": HANDSHAKE_TIMEOUT, "control_send_timeout": SEND_TIMEOUT}
    with handoff_cluster(c, agent=settings) as (router, agents):
        agent = agents[0]
        try:
            router.wait_healthy()
            # A real HELLO and PROOF, off the wire: the router reconnects to a restarted agent.
            wiretap = ControlWiretap(c.targets[0].ns, c.router.ip)
            stopping = time.monotonic()
            agent.stop()
            agent_stop_seconds = time.monotonic() - stopping
            agent.start()
            assert wait_for(lambda: wiretap.handshake() is not None, 20), "no handshake captured"
            hello, proof = wiretap.handshake()  # type: ignore[misc]
            wiretap.close()
            wiretap = None
            # Once more: the agent now running never saw that HELLO.
            agent.stop()
            agent.start()
            assert wait_for(lambda: agent.metrics().get('arr_agent_control_sessions{stage="proven"}') == 1, 20)
            assert wait_for(lambda: c.curl(router.url + info.url_path).sha256 == info.sha256, 10)
            handoffs_before = router.metric_sum("arr_handoffs_total", result="ok")
            requests_before = router.metric_sum("arr_requests_total", decision="handoff")

            baseline = timed_requests(c, router, info, REQUESTS)
            sampler = ResourceSampler(agent.proc.pid)  # type: ignore[union-attr]
            fds_before, rss_before = sampler.sample()
            sampler.start()
            attacker = Attacker(c, hello, proof, psk)
            attacker.start()
            assert attacker.phase_done.wait(60), "the replays did not finish"
            under_attack = timed_requests(c, router, info, REQUESTS)  # the holders are held meanwhile
            time.sleep(max(0.0, SEND_TIMEOUT + 1.0))  # the non-reader's drop
            attacker.stop.set()
            attacker.join(60)
            assert not attacker.is_alive() and attacker.failure is None, attacker.failure
            sampler.stop.set()
            sampler.join(5)
            fds_after, rss_after = sampler.sample()

            counts = rejected(agent)
            metrics = agent.metrics()
            handoffs = router.metric_sum("arr_handoffs_total", result="ok") - handoffs_before
            decided = router.metric_sum("arr_requests_total", decision="handoff") - requests_before
            fallbacks = router.metric_sum("arr_handoff_fallbacks_total")
            print(f"\nagent stop with a router connected: {agent_stop_seconds:.2f}s"
                  f"\nrejected by reason: {dict(sorted(counts.items()))}"
                  f"\nattacker: {len(attacker.received)} unproven connections, "
                  f"{sum(map(len, attacker.received))} bytes received in all; errors {dict(attacker.errors)}"
                  f"\nlifetimes (s): " + ", ".join(f"{k} n={len(v)} max={max(v):.2f}"
                                                   for k, v in sorted(attacker.lifetimes.items()))
                  + f"\nauthenticated non-reader: {attacker.flood_sent} PINGs, cut after "
                  f"{attacker.flood_cut_after}s"
                  f"\nagent fds {fds_before} -> peak {sampler.peak_fds} -> {fds_after}; "
                  f"RSS {rss_before / 2**20:.1f} -> peak {sampler.peak_rss / 2**20:.1f} -> "
                  f"{rss_after / 2**20:.1f} MiB"
                  f"\nlatency median baseline {statistics.median(baseline) * 1000:.2f} ms, "
                  f"under attack {statistics.median(under_attack) * 1000:.2f} ms; max "
                  f"{max(baseline) * 1000:.2f} / {max(under_attack) * 1000:.2f} ms"
                  f"\nrouter: {handoffs:.0f} handoffs ok of {2 * REQUESTS} requests, fallbacks {fallbacks:.0f}")

            # Everything refused or dropped, and counted by its reason.
            assert counts.get("bad-proof", 0) >= 1  # the whole recorded handshake
            assert counts.get("oversize", 0) >= 1
            assert counts.get("replay", 0) >= 50
            assert counts.get("stalled-frame", 0) >= 1 and counts.get("handshake-timeout", 0) >= 1
            assert counts.get("slow-reader", 0) == 1  # the router with the key that does not read
            refused = sum(v for k, v in counts.items() if k.startswith("too-many"))
            assert counts.get("replay", 0) + refused >= 1050
            assert sum(counts.values()) >= len(attacker.received)
            # An unproven peer got nothing but the handshake: a CHALLENGE at most, never a report.
            kinds = Counter(frame[5] for got in attacker.received for frame in split_frames(got))
            assert set(kinds) <= {MessageType.CHALLENGE}, kinds
            assert sum(kinds.values()) <= len(attacker.lifetimes.get("stalled-prefix", [])) + \
                len(attacker.lifetimes.get("silent", [])) + 2
            # Cut in time: the stalled and silent at the handshake's deadline, the non-reader at its send deadline.
            for kind in ("stalled-prefix", "silent"):
                assert max(attacker.lifetimes[kind]) < HANDSHAKE_TIMEOUT + 1.5, kind
            assert max(attacker.lifetimes["replay"]) < 1.0
            assert attacker.flood_cut_after is not None and attacker.flood_cut_after < SEND_TIMEOUT + 8
            # Bounded: the agent held a handful of fds, not one per attacker connection.
            assert sampler.peak_fds <= fds_before + 110, (fds_before, sampler.peak_fds)
            assert fds_after <= fds_before + 2
            assert sampler.peak_rss - rss_before < 40 * 2**20
            # The real router's session was never touched.
            assert metrics.get('arr_agent_control_sessions{stage="proven"}') == 1
            assert handoffs == decided == 2 * REQUESTS and fallbacks == 0
            assert statistics.median(under_attack) <= 1.5 * statistics.median(baseline) + 0.005
            assert agent_stop_seconds < 5.0
        finally:
            if attacker is not None:
                attacker.stop.set()
                attacker.join(60)
            if sampler is not None:
                sampler.stop.set()
                sampler.join(5)
            if wiretap is not None:
                wiretap.close()
    # At shutdown the agent logged its rejections in one line.
    assert "control connections rejected:" in agent.log_tail(20000)
