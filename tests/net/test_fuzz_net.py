"""Fuzzing the router's front-end against its documented answers (issue 13).

A router in nat mode with two nginx targets (pool a = t0, the default; pool
b = t1), rules and limits from ``http_fuzz`` (which also holds the table of
documented answers, ``ORACLE``). While two clients download 16 MiB and 64 MiB
files through it over and over, hypothesis generates more than 10,000 requests
(``http_fuzz.cases``: valid ones with wild paths, versions, headers and bodies,
and every malformed kind of the contract), sent up to CONCURRENCY at a time,
each on its own connection from the client namespace. For each:

* the status line arrives within 1 s of the connect (slow kinds: within their
  configured limit + 1 s), and is the oracle's: the router's own answer (no
  ``Server: nginx``) for what it refuses, the target's own answer (the test
  asks the target directly, for the normalised request) for what it forwards;
* where the router answers an error, it closes the connection; after
  ``OPTIONS *`` it keeps it (a second one is answered);
* file GETs are SHA-256 checked.

At the end: the router is alive and logged no traceback, every download was
byte-exact, ``arr_client_errors`` by status and the reject/forward decision
counters add up to what was sent, and the targets' access logs hold each
forwarded request (found by the unique tag in its query) once, on the target
its pool names, with the normalised path, and no request the router refused
or a rule sent elsewhere.

Failures are collected rather than raised at once (so one run lists every
contract row that does not hold), then reported together, by kind, with the
shortest inputs. The run is reproducible: ARR_FUZZ_SEED (printed) fixes the
inputs; ARR_FUZZ_EXAMPLES scales it (batches of BATCH requests).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, example, given, seed, settings

from arr import netlink
from arr.testbed import Cluster
from arr.testbed.router import AGENT_PORT, ROUTER_PORT, handoff_cluster

import http_fuzz as hf  # noqa: E402  (tests/net is on sys.path: rootdir-relative imports, like conftest)

pytestmark = pytest.mark.net

SEED = int(os.environ.get("ARR_FUZZ_SEED", "1313"))
BATCH = 20
EXAMPLES = int(os.environ.get("ARR_FUZZ_EXAMPLES", "510"))  # x BATCH, plus the explicit batch
MIN_REQUESTS = 10_000
CONCURRENCY = 12  # fast requests in flight
SLOW_CONCURRENCY = 48  # slow kinds in flight (they mostly sleep)
WAIT_EXTRA = 3.0  # how long past its bound a request is still waited for (to report what came)
TAG_RE = re.compile(r"arrfz=([0-9a-f]{12})")
LOG_RE = re.compile(r'^(\S+) (\S+) \[[^\]]*\] "((?:[^"\\]|\\.)*)" (\d+) ')


def target_entry(c: Cluster, i: int) -> dict:
    t = c.targets[i]
    return {"address": f"{t.ip}:{c.spec.target_port}", "name": t.name, "agent": f"{t.ip}:{AGENT_PORT}"}


def sections(c: Cluster) -> dict:
    return {
        "limits": dict(hf.LIMITS),
        "targets": None, "policy": None, "health": None,
        "pools": {pool: {"targets": [target_entry(c, i)]} for pool, i in hf.POOL_TARGET.items()},
        "default_pool": hf.DEFAULT_POOL,
        "rules": hf.RULES,
    }


# ------------------------------------------------------------------ one request

@dataclass
class Answer:
    status: int = 0  # 0: closed without a status line; -1: reset; -2: nothing within the wait
    reason: bytes = b""
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    elapsed: float = 0.0  # from the row's reference point to the status line
    closed: bool | None = None  # after the answer: EOF/reset within 1 s (only where checked)
    error: str = ""

    @property
    def from_nginx(self) -> bool:
        return any(v.lower().startswith("nginx") for v in self.headers.get("server", []))

    def show(self) -> str:
        if self.status <= 0:
            return {0: "closed without an answer", -1: f"reset ({self.error})",
                    -2: "no answer"}.get(self.status, "?") + f" after {self.elapsed:.2f}s"
        by = "nginx" if self.from_nginx else "router"
        return f"{self.status} from {by} after {self.elapsed:.2f}s"


@dataclass
class Result:
    case: hf.Case
    tag: str
    sent: bytes
    outcomes: tuple[hf.Outcome, ...]
    wants: dict[hf.Outcome, int]  # outcome -> the status it means (the target's answer resolved)
    answer: Answer
    problems: list[str]
    matched: hf.Outcome | None = None


async def read_head(reader: asyncio.StreamReader) -> tuple[int, bytes, dict[str, list[str]]]:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not a status line: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, list[str]] = defaultdict(list)
        for line in lines[1:]:
            if b":" in line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower().decode("latin-1")].append(value.strip().decode("latin-1"))
        if 100 <= status < 200:
            continue  # 100 Continue and friends: the final answer follows
        return status, parts[2] if len(parts) > 2 else b"", dict(headers)


async def read_body(reader: asyncio.StreamReader, method: str, status: int, headers: dict[str, list[str]]) -> bytes:
    if method == "HEAD" or status in (204, 304):
        return b""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"][0]))
    if any("chunked" in v.lower() for v in headers.get("transfer-encoding", [])):
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return out
            out += (await reader.readexactly(size + 2))[:-2]
    return await reader.read()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the peer closes (EOF or reset) within SECONDS; bytes before are skipped."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


class Fuzzer:
    """Sends cases from a private event loop thread; checks each as it ends."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.address = (c.vip, ROUTER_PORT)
        self.loop = asyncio.SelectorEventLoop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.results: list[Result] = []
        self.tasks: set[asyncio.Task] = set()
        self.direct: dict[tuple, asyncio.Future] = {}
        self.counter = 0
        self.fast: asyncio.Semaphore
        self.slow: asyncio.Semaphore
        self.thread.start()
        self.call(self._init())

    async def _init(self) -> None:
        self.fast = asyncio.Semaphore(CONCURRENCY)
        self.slow = asyncio.Semaphore(SLOW_CONCURRENCY)

    def call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, cases: list[hf.Case]) -> None:
        """Start CASES (blocks while CONCURRENCY requests are in flight)."""
        socks = netlink.run_in_netns(self.c.client.ns, lambda: [socket.socket() for _ in cases])
        self.call(self._start(cases, socks), timeout=300)

    async def _start(self, cases: list[hf.Case], socks: list[socket.socket]) -> None:
        for case, sock in zip(cases, socks):
            gate = self.slow if case.slow else self.fast
            await gate.acquire()
            self.counter += 1
            tag = f"{SEED & 0xffff:04x}{self.counter:08x}"
            task = asyncio.get_running_loop().create_task(self._run(case, sock, tag, gate))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def wait(self, timeout: float = 120.0) -> None:
        async def all_done() -> None:
            while self.tasks:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.call(all_done(), timeout)

    def close(self) -> None:
        async def cancel() -> None:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        try:
            self.call(cancel(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # -------------------------------------------------------------- the target's own answer

    async def target_answer(self, outcome: hf.Outcome, case: hf.Case) -> int:
        """What the pool's target answers the normalised request itself (asked
        from its own namespace; cached by method, path, version and framing)."""
        version = "HTTP/1.0" if case.version == "HTTP/1.0" else "HTTP/1.1"
        key = (outcome.by, case.method, outcome.path, version, case.body)
        if key not in self.direct:
            self.direct[key] = asyncio.ensure_future(self._ask_target(*key))
        return await asyncio.shield(self.direct[key])

    async def _ask_target(self, pool: str, method: str, path: str, version: str, body: str) -> int:
        host = self.c.targets[hf.POOL_TARGET[pool]]
        framing = {"none": b"", "length": b"Content-Length: 1\r\n",
                   "chunked": b"Transfer-Encoding: chunked\r\n"}[body]
        payload = {"none": b"", "length": b"x", "chunked": b"1\r\nx\r\n0\r\n\r\n"}[body]
        request = (f"{method} {path} {version}\r\nHost: a.example\r\nConnection: close\r\n".encode("latin-1")
                   + framing + b"\r\n" + payload)
        sock = netlink.socket_in_netns(host.ns)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(10):
                await loop.sock_connect(sock, (host.ip, self.c.spec.target_port))
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(request)
                status, _, headers = await read_head(reader)
            writer.close()
            assert any(v.startswith("nginx") for v in headers.get("server", [])), headers
            return status
        finally:
            sock.close()

    # -------------------------------------------------------------- a case

    async def _run(self, case: hf.Case, sock: socket.socket, tag: str, gate: asyncio.Semaphore) -> None:
        try:
            result = await self._exchange(case, sock, tag)
        except Exception as exc:  # a bug of the test itself: reported with the case
            result = Result(case, tag, case.data, (), {}, Answer(error=repr(exc)),
                            [f"test error: {exc!r}"])
        finally:
            sock.close()
            gate.release()
        self.results.append(result)

    async def _exchange(self, case: hf.Case, sock: socket.socket, tag: str) -> Result:
        loop = asyncio.get_running_loop()
        row = hf.ORACLE[case.kind]
        data = case.data.replace(hf.TAG, f"arrfz={tag}".encode())
        outcomes = hf.expect(case)
        wants = {o: (o.status if o.status is not None else await self.target_answer(o, case)) for o in outcomes}
        bound = hf.bound(case.kind)
        answer = Answer()
        trickler = None
        sock.setblocking(False)
        started = time.monotonic()
        try:
            async with asyncio.timeout(5):
                await loop.sock_connect(sock, self.address)
                reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        except (OSError, TimeoutError) as exc:
            answer.status, answer.error = -1, f"connect: {exc}"
            return self._judge(case, tag, data, outcomes, wants, answer, bound)
        head_sent = started
        try:
            if data:
                writer.write(data)
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    pass  # the router may answer and close before reading it all
            head_sent = time.monotonic()
            if case.trickle:
                trickler = loop.create_task(trickle(writer, *case.trickle))
            since = started if row.since == "connect" else head_sent
            try:
                async with asyncio.timeout(since + bound + WAIT_EXTRA - time.monotonic()):
                    answer.status, answer.reason, answer.headers = await read_head(reader)
                answer.elapsed = time.monotonic() - since
            except TimeoutError:
                answer.status, answer.elapsed = -2, time.monotonic() - since
            except asyncio.IncompleteReadError:
                answer.status, answer.elapsed = 0, time.monotonic() - since
            except (ConnectionError, OSError) as exc:
                answer.status, answer.elapsed, answer.error = -1, time.monotonic() - since, type(exc).__name__
            except ValueError as exc:
                answer.status, answer.elapsed, answer.error = 0, time.monotonic() - since, str(exc)
            if trickler:
                trickler.cancel()
            if answer.status > 0:
                try:
                    async with asyncio.timeout(10):
                        answer.body = await read_body(reader, case.method, answer.status, answer.headers)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
                    answer.error = f"body: {exc!r}"
                if row.close and not answer.from_nginx:
                    answer.closed = await closed_within(reader, 1.0)
                elif row.close is False and case.follow_up and answer.status == 200:
                    writer.write(case.follow_up)
                    try:
                        async with asyncio.timeout(hf.AT_ONCE):
                            second, _, _ = await read_head(reader)
                        answer.closed = second != 200
                    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
                        answer.closed = True
        finally:
            if trickler:
                trickler.cancel()
            writer.close()
        return self._judge(case, tag, data, outcomes, wants, answer, bound)

    def _judge(self, case: hf.Case, tag: str, data: bytes, outcomes: tuple[hf.Outcome, ...],
               wants: dict[hf.Outcome, int], answer: Answer, bound: float) -> Result:
        problems: list[str] = []
        matched = None
        for outcome in outcomes:
            by_router = outcome.by == "router"
            if answer.status == wants[outcome] and answer.status > 0 and by_router != answer.from_nginx:
                matched = outcome
                break
        if matched is None:
            want = " or ".join(f"{wants[o]} ({o.describe()})" for o in outcomes)
            problems.append(f"status: got {answer.show()}, want {want}")
        if answer.status > 0 and answer.elapsed > bound:
            problems.append(f"late: {answer.show()}, bound {bound:.1f}s")
        row = hf.ORACLE[case.kind]
        if matched is not None and matched.by == "router":
            if row.close and answer.closed is False:
                problems.append("not closed after the router's error answer")
            if row.close is False and answer.closed:
                problems.append("connection not kept after OPTIONS * (second OPTIONS * not answered 200)")
        if case.kind == "options-star" and answer.status == 200:
            if "allow" not in answer.headers:
                problems.append("OPTIONS *: no Allow header")
            if answer.headers.get("content-length", ["?"])[0] != "0":
                problems.append(f"OPTIONS *: content-length {answer.headers.get('content-length')}, want 0")
        if matched is not None and matched.by != "router" and answer.status == 200 and case.method == "GET":
            name = (matched.path or "").removeprefix("/files/")
            if matched.path and matched.path.startswith("/files/") and name in hf.FUZZ_FILES:
                info = self.c.files[name]
                if hashlib.sha256(answer.body).hexdigest() != info.sha256:
                    problems.append(f"body of {matched.path}: {len(answer.body)} bytes, SHA-256 differs")
        return Result(case, tag, data, outcomes, wants, answer, problems, matched)


async def trickle(writer: asyncio.StreamWriter, piece: bytes, interval: float) -> None:
    try:
        while True:
            await asyncio.sleep(interval)
            writer.write(piece)
            await writer.drain()
    except (ConnectionError, OSError):
        pass


# ------------------------------------------------------------------ downloads beside the fuzz

class Downloads:
    """Clients downloading big files through the router until stopped."""

    def __init__(self, c: Cluster, url: str) -> None:
        self.c, self.url = c, url
        self.stop = threading.Event()
        self.results: list[tuple[str, int, int, bool, str]] = []
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="download")
        self.futures = [self.pool.submit(self._loop, "16m", "16M"), self.pool.submit(self._loop, "64m", "12M")]

    def _loop(self, name: str, rate: str) -> None:
        info = self.c.files[name]
        while not self.stop.is_set() or not any(r[0] == name for r in self.results):
            r = self.c.curl(self.url + info.url_path, extra_args=("--limit-rate", rate), timeout=120)
            self.results.append((name, r.status, r.size, r.sha256 == info.sha256, r.error[-200:]))

    def finish(self) -> None:
        self.stop.set()
        for f in self.futures:
            try:
                f.result(timeout=300)
            except Exception as exc:  # noqa: BLE001 - reported as a failed download
                self.results.append(("?", 0, 0, False, repr(exc)))
        self.pool.shutdown()


# ------------------------------------------------------------------ checks after the run

def nginx_requests(c: Cluster) -> dict[str, list[tuple[str, str, str]]]:
    """tag -> [(target name, request line, remote address)] from both access logs."""
    found: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for i, t in enumerate(c.targets):
        for line in c.nginx_log(i):
            m = LOG_RE.match(line)
            tag = TAG_RE.search(line)
            if m and tag:
                found[tag.group(1)].append((t.name, m.group(3), m.group(1)))
    return found


def log_problems(c: Cluster, results: list[Result]) -> dict[str, list[str]]:
    """Per case tag: where its request was logged that the oracle says it must not be."""
    logged = nginx_requests(c)
    names = {pool: c.targets[i].name for pool, i in hf.POOL_TARGET.items()}
    problems: dict[str, list[str]] = {}
    for r in results:
        lines = logged.get(r.tag, [])
        allowed: dict[str, list[hf.Outcome]] = defaultdict(list)
        for o in r.outcomes:
            if o.by != "router":
                allowed[names[o.by]].append(o)
        errs = []
        if not allowed:
            if lines:
                errs.append(f"refused by the oracle ({r.outcomes[0].describe()}) but reached "
                            + ", ".join(f"{t}: {req!r}" for t, req, _ in lines))
        elif r.matched is not None and r.matched.by != "router":
            if len(lines) != 1:
                errs.append(f"logged {len(lines)} times: {lines}")
            for target, request, _ in lines:
                if target not in allowed:
                    errs.append(f"reached {target} ({request!r}); its pool is "
                                + " or ".join(f"{o.by} ({names[o.by]})" for os_ in allowed.values() for o in os_))
                    continue
                parts = request.split(" ")
                path = parts[1].partition("?")[0] if len(parts) == 3 else request
                if re.fullmatch(r"HTTP/1\.[2-9]", r.case.version) and parts[-1] != "HTTP/1.1":
                    errs.append(f"{r.case.version} request forwarded as {request!r}, want HTTP/1.1")
                paths = [o.path or "" for o in allowed[target]]
                if not any(hf.canonical(path) == hf.canonical(p) for p in paths):
                    errs.append(f"{target} received {request!r}, want the normalised path "
                                + " or ".join(map(repr, paths)))
        if errs:
            problems[r.tag] = errs
    return problems


def unexplained_lines(c: Cluster, results: list[Result]) -> list[str]:
    """Requests the targets logged from the router that no case and no download
    explains (a request whose tag got lost on the way, say)."""
    tags = {r.tag for r in results}
    plain = {f"GET {f.url_path} HTTP/1.1" for f in c.files.values()}
    out = []
    for i, t in enumerate(c.targets):
        for line in c.nginx_log(i):
            m = LOG_RE.match(line)
            if m is None:
                out.append(f"{t.name}: unparsed log line {line[:200]!r}")
                continue
            if m.group(1) == t.ip:
                continue  # the test asking the target itself (target_answer)
            tag = TAG_RE.search(m.group(3))
            if (tag and tag.group(1) in tags) or m.group(3) in plain:
                continue
            out.append(f"{t.name}: {line[:200]}")
    return out


def metric_by(samples: dict[str, float], name: str, label: str) -> Counter:
    out: Counter = Counter()
    for key, value in samples.items():
        sample, _, labels = key.partition("{")
        if sample == name:
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            out[found.get(label, "")] += value
    return out


def latency(results: list[Result]) -> str:
    """Answer times: percentiles of the at-once kinds; each slow kind's latest
    answer past its configured limit."""
    fast = sorted(r.answer.elapsed for r in results if not r.case.slow and r.answer.status > 0)
    if not fast:
        return "no answers"
    pick = lambda q: fast[min(len(fast) - 1, int(q * len(fast)))]  # noqa: E731
    text = (f"at-once answers: p50 {pick(0.5) * 1000:.1f} ms, p99 {pick(0.99) * 1000:.1f} ms, "
            f"max {fast[-1] * 1000:.0f} ms")
    late: dict[str, float] = {}
    for r in results:
        if r.case.slow and r.answer.status > 0:
            over = r.answer.elapsed - (hf.bound(r.case.kind) - hf.SLACK)
            late[r.case.kind] = max(late.get(r.case.kind, -99.0), over)
    return text + "; slow kinds, latest answer past the limit: " + ", ".join(
        f"{k} {v:+.2f}s" for k, v in sorted(late.items()))


def short(data: bytes, limit: int = 160) -> str:
    text = repr(data)
    return text if len(text) <= limit else text[:limit] + f"...({len(data)} bytes)"


def summary(results: list[Result], logs: dict[str, list[str]]) -> tuple[str, int]:
    """A table by kind (sent, failed) with the shortest failing inputs; and how many failed."""
    by_kind: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_kind[r.case.kind].append(r)
    lines, failed = [], 0
    for kind, row in hf.ORACLE.items():
        rs = by_kind.get(kind, [])
        bad = [r for r in rs if r.problems or r.tag in logs]
        failed += len(bad)
        mark = "FAIL" if bad else ("ok" if rs else "not sent")
        lines.append(f"{mark:8} {kind:20} item {row.contract:4} sent {len(rs):5}  failed {len(bad):5}")
        for r in sorted(bad, key=lambda r: len(r.sent))[:3]:
            why = "; ".join(r.problems + logs.get(r.tag, []))
            lines.append(f"           {short(r.sent)}\n             -> {why}")
        if bad:
            answers = Counter(r.answer.show().split(" after ")[0] for r in bad)
            lines.append(f"           answers of the failed: {dict(answers.most_common(6))}")
    return "\n".join(lines), failed


# ------------------------------------------------------------------ the test

def test_fuzzed_requests_get_their_documented_answers(cluster):
    files = {**hf.FUZZ_FILES, **hf.DOWNLOAD_FILES}
    c = cluster(targets=2, files=files)
    started = time.monotonic()
    with handoff_cluster(c, **sections(c)) as (router, agents):
        router.wait_healthy()
        # A plain request first: if this fails nothing else can be judged.
        first = c.curl(router.url + "/files/1k")
        assert (first.status, first.sha256) == (200, c.files["1k"].sha256), first.error
        fuzzer = downloads = None
        inputs = hashlib.sha256()  # of everything generated, in order: same seed, same digest
        try:
            fuzzer = Fuzzer(c)
            downloads = Downloads(c, router.url)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                      phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck),
                      print_blob=False)
            @seed(SEED)
            @example(batch=hf.explicit_batch())
            @given(batch=hf.batches(BATCH))
            def fuzz(batch: list[hf.Case]) -> None:
                for case in batch:
                    inputs.update(case.data)
                fuzzer.submit(batch)

            fuzz()
            fuzzer.wait(timeout=120)
            fuzz_time = time.monotonic() - started
        finally:
            if fuzzer is not None:
                fuzzer.close()
            if downloads is not None:
                downloads.finish()

        results = fuzzer.results
        alive = router.proc is not None and router.proc.poll() is None
        # nginx logs a request once it is done: wait for the forwarded ones.
        forwarded = [r for r in results if r.matched is not None and r.matched.by != "router"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            logged = nginx_requests(c)
            if all(r.tag in logged for r in forwarded):
                break
            time.sleep(0.2)
        logs = log_problems(c, results)
        unexplained = unexplained_lines(c, results)
        samples = router.metrics() if alive else {}
        router_log = router.log_tail(1 << 22)

    table, failed = summary(results, logs)
    problems: list[str] = []
    if failed:
        problems.append(f"{failed} of {len(results)} requests did not get their documented answer")
    if len(results) < MIN_REQUESTS:
        problems.append(f"only {len(results)} requests sent, want >= {MIN_REQUESTS}")
    if unexplained:
        problems.append(f"{len(unexplained)} requests reached a target that no case sent: {unexplained[:5]}")
    if not alive:
        problems.append("the router process died")
    if "Traceback" in router_log:
        problems.append("the router logged a traceback: "
                        + router_log[router_log.index("Traceback"):][:1500])
    bad_downloads = [d for d in downloads.results if not (d[1] == 200 and d[3])]
    if bad_downloads or not downloads.results:
        problems.append(f"downloads not byte-exact: {bad_downloads[:5]} of {len(downloads.results)}")

    # The router's counters against what was sent (what the oracle expects).
    expected_errors: Counter = Counter()
    answered_errors: Counter = Counter()
    rejects = forwards = 0
    for r in results:
        want = r.outcomes[0] if len(r.outcomes) == 1 else r.matched
        if want is None:
            continue
        if want.counted == "client-error":
            expected_errors[str(want.status)] += 1
        elif want.counted == "reject":
            rejects += 1
        elif want.counted == "forwarded":
            forwards += 1
        if r.answer.status > 0 and not r.answer.from_nginx and want.counted == "client-error":
            answered_errors[str(r.answer.status)] += 1
    counted_errors = Counter({k: int(v) for k, v in metric_by(samples, "arr_client_errors_total", "status").items()
                              if v})
    decisions = Counter({k: int(v) for k, v in metric_by(samples, "arr_requests_total", "decision").items() if v})
    reasons = Counter({k: int(v) for k, v in metric_by(samples, "arr_client_errors_total", "reason").items() if v})
    if samples and counted_errors != +expected_errors:
        problems.append(f"arr_client_errors by status {dict(sorted(counted_errors.items()))}, want "
                        f"{dict(sorted(expected_errors.items()))} (router answers seen: "
                        f"{dict(sorted(answered_errors.items()))})")
    if samples and decisions.get("reject", 0) != rejects:
        problems.append(f"arr_requests{{decision=reject}} {decisions.get('reject', 0)}, want {rejects}")
    handed = decisions.get("handoff", 0) + decisions.get("proxy", 0)
    if samples and handed != forwards + len(downloads.results) + 1:
        problems.append(f"arr_requests{{decision=handoff|proxy}} {handed}, want {forwards} forwarded + "
                        f"{len(downloads.results)} downloads + 1")

    report = (f"\nfuzz seed {SEED} (inputs {inputs.hexdigest()[:16]}): {len(results)} requests in {fuzz_time:.1f}s "
              f"({len(downloads.results)} downloads beside, {sum(d[2] for d in downloads.results) >> 20} MiB)\n"
              f"{latency(results)}\n"
              f"decisions {dict(decisions)}; client errors by reason {dict(reasons)}\n{table}")
    print(report)
    assert not problems, "\n".join(problems) + f"\n(reproduce with ARR_FUZZ_SEED={SEED})" + report
