"""Runtime control of a running router (issue 12): SIGHUP reloads without
dropping a download, a broken file changes nothing; the admin socket drains
a target and lists targets, field by field; the access log says what the
router saw (handed-off requests without a status), and how each handed-off
connection ended (from the agent's CLOSED)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from arr.testbed import slowclient
from arr.testbed.files import sha256_file
from arr.testbed.router import handoff_cluster, to_toml, wait_for

pytestmark = pytest.mark.net

MiB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def targets_of(c, indexes):
    return [{"address": f"{c.targets[i].ip}:{c.spec.target_port}", "name": c.targets[i].name,
             "agent": f"{c.targets[i].ip}:7070"} for i in indexes]


def admin(c, router, *args: str) -> object:
    cp = c.exec(c.router, [sys.executable, "-m", "arr", *args, "--json",
                           "--socket", router.config["router"]["admin_socket"]],
                check=False, env={"PYTHONPATH": str(PROJECT_ROOT)})
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def whoami(c, router, n: int) -> list[str]:
    out = c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "--max-time", "10",
                            *[router.url + "/whoami"] * n]).stdout
    return out.split()


def rewrite_config(router, config: dict | str) -> None:
    path = router.cluster.workdir / f"{router.name}.toml"
    path.write_text(config if isinstance(config, str) else to_toml(config))
    os.kill(router.proc.pid, signal.SIGHUP)


def access_records(router) -> list[dict]:
    lines = router.log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_sighup_adds_a_target_during_downloads_and_a_broken_file_changes_nothing(cluster):
    c = cluster(targets=3, files={"64m": 64 * MiB})
    info = c.files["64m"]
    with handoff_cluster(c, targets=targets_of(c, [0, 1]), router={"access_log": "stderr"}) as (router, _):
        router.wait_healthy(count=2)
        outs = [c.workdir / f"dl{i}" for i in range(4)]
        # 64 MiB at 12 MiB/s each: in flight through both reloads.
        curls = [slowclient.start(c, router.url + info.url_path, out, 12 << 20) for out in outs]
        try:
            assert wait_for(lambda: all(o.exists() and o.stat().st_size > 8 * MiB for o in outs), 20)
            assert set(whoami(c, router, 4)) == {c.targets[0].name, c.targets[1].name}
            # Add t2: the downloads run on, the new target gets requests.
            rewrite_config(router, {**router.config, "targets": targets_of(c, [0, 1, 2])})
            assert wait_for(lambda: "configuration reloaded" in router.log_tail(20000), 10), router.log_tail()
            router.wait_healthy(count=3)
            decided_for_t2 = router.metric_sum("arr_requests_total", target=c.targets[2].name)
            served = whoami(c, router, 9)
            assert served.count(c.targets[2].name) == 3, served  # round-robin over three
            # ... and the router's policy decided those three (not a connection left over).
            assert router.metric_sum("arr_requests_total", target=c.targets[2].name) - decided_for_t2 == 3
            # A broken file: nothing changes, the reason is logged.
            rewrite_config(router, "[router\nlisten = ")
            assert wait_for(lambda: "reload of" in router.log_tail(20000)
                            and "keeping the running configuration" in router.log_tail(20000), 10)
            listed = admin(c, router, "targets")
            assert sorted(t["target"] for t in listed) == sorted(t.name for t in c.targets)
            assert set(whoami(c, router, 6)) == {t.name for t in c.targets}
            assert all(curl.poll() is None for curl in curls), "a download ended before the reloads were done"
            for curl, out in zip(curls, outs):
                stdout, stderr = curl.communicate(timeout=60)
                assert stdout.strip() == "200" and curl.returncode == 0, stderr
                assert sha256_file(out)[0] == info.sha256
        finally:
            for curl in curls:
                if curl.poll() is None:
                    c.stop_process(curl)
        assert router.proc.poll() is None  # SIGHUP never stops the router
        assert router.metric_sum("arr_handoff_fallbacks_total") == 0
        records = [r for r in access_records(router) if r["type"] == "request"]
        handed = [r for r in records if r["decision"] == "handoff"]
        assert handed and all(r["status"] is None and r["handed_off"] and r["response_bytes"] is None
                              for r in handed)
        assert all(r["user_agent"].startswith(("curl/", "arr-slowclient")) and r["id"] and r["time"].endswith("Z")
                   for r in records)
        # Ended connections are recorded from the agents' CLOSED: the downloads' bytes, served by the targets.
        assert wait_for(lambda: sum(1 for r in access_records(router) if r["type"] == "connection_end"
                                    and r["target_bytes"] >= info.size) >= 4, 10)
        assert router.metric_sum("arr_handed_off_bytes_total", direction="target") >= 4 * info.size


def test_drain_through_the_admin_socket(cluster):
    c = cluster(targets=2, files={"16m": 16 * MiB})
    info = c.files["16m"]
    with handoff_cluster(c, targets=targets_of(c, [0, 1])) as (router, _):
        router.wait_healthy()
        listed = admin(c, router, "targets")
        assert len(listed) == 2
        for entry, host in zip(sorted(listed, key=lambda t: t["target"]), c.targets):
            assert entry == {"pool": "default", "target": host.name,
                             "address": f"{host.ip}:{c.spec.target_port}", "weight": 1, "configured_weight": 1,
                             "healthy": True, "draining": False, "available": True, "in_flight": 0,
                             "handed_off": 0, "load": 0}
        # A slow download on t0, then drain t0: it finishes, t0 gets nothing new.
        out = c.workdir / "slow"
        curl = None
        for _ in range(4):  # round-robin: the first request may land on either target
            curl = slowclient.start(c, router.url + info.url_path, out, 4 << 20)  # 16 MiB: 4 s
            time.sleep(0.5)
            on_t0 = [t for t in admin(c, router, "targets") if t["target"] == c.targets[0].name][0]
            if on_t0["handed_off"] == 1:
                break
            c.stop_process(curl)
        else:
            pytest.fail("no download landed on t0")
        try:
            drained = admin(c, router, "drain", c.targets[0].name)
            assert [(d["target"], d["draining"], d["available"], d["handed_off"]) for d in drained] == [
                (c.targets[0].name, True, False, 1)]
            assert router.metric_sum("arr_target_up", target=c.targets[0].name) == 0
            before = router.metric_sum("arr_requests_total", target=c.targets[0].name)
            assert whoami(c, router, 10) == [c.targets[1].name] * 10
            assert router.metric_sum("arr_requests_total", target=c.targets[0].name) == before
            assert router.metric_sum("arr_requests_total", target=c.targets[1].name) >= 10
            assert curl.poll() is None, "the download ended before the drain was checked"
            stdout, stderr = curl.communicate(timeout=60)
            assert stdout.strip() == "200" and sha256_file(out)[0] == info.sha256, stderr
            admin(c, router, "enable", f"{c.targets[0].ip}:{c.spec.target_port}")
            assert c.targets[0].name in whoami(c, router, 4)
            weighted = admin(c, router, "weight", c.targets[1].name, "3")
            assert weighted[0]["weight"] == 3 and weighted[0]["configured_weight"] == 1
            status = admin(c, router, "status")
            assert status["mode"] == "nat" and status["pools"] == ["default"]
        finally:
            if curl.poll() is None:
                c.stop_process(curl)
        # Unknown target: a clear error, exit 1, nothing changed.
        cp = c.exec(c.router, [sys.executable, "-m", "arr", "drain", "nope", "--socket",
                               router.config["router"]["admin_socket"]], check=False,
                    env={"PYTHONPATH": str(PROJECT_ROOT)})
        assert cp.returncode == 1 and "no target 'nope'" in cp.stderr
