"""``arr conns`` on real pinned maps: named fields on both sides, filters,
the summary, and pinned instances with their owners (handoff/inspect.py,
handoff/instances.py)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arr import netlink
from arr.testbed import slowclient
from arr.testbed.router import BPF_DIR, handoff_cluster, pin_instance, wait_for
from handoff.instances import OWNERS_DIR

pytestmark = pytest.mark.net

MiB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def conns(cluster, host, *args: str):
    out = cluster.exec(host, [sys.executable, "-m", "arr", "conns", "--bpf-dir", BPF_DIR, *args],
                       check=True, env={"PYTHONPATH": str(PROJECT_ROOT)}).stdout
    return json.loads(out)


def test_conns_names_filters_and_sums_live_connections(cluster):
    c = cluster(targets=2, files={"8m": 8 * MiB})
    info = c.files["8m"]
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        # 8 MiB at 1 MiB/s each: live entries for the whole test.
        curls = [slowclient.start(c, router.url + info.url_path, c.workdir / f"slow{i}", 1 << 20) for i in range(2)]
        try:
            where = ["--instance", pin_instance(c, c.router)]
            assert wait_for(lambda: len(conns(c, c.router, "--json", *where)) == 2, 10)
            listed = conns(c, c.router, "--json", *where)
            targets = {t.ip for t in c.targets}
            for entry in listed:
                assert entry["side"] == "router" and entry["client_ip"] == c.client.ip
                assert entry["service_ip"] == c.vip and entry["service_port"] == 80
                assert entry["target_ip"] in targets and entry["state"] == "active"
            # Round-robin: one on each target; --target selects exactly one.
            t0 = c.targets[0].ip
            mine = conns(c, c.router, "--json", "--target", t0, *where)
            assert [e["target_ip"] for e in mine] == [t0]
            assert conns(c, c.router, "--json", "--client", "192.0.2.0/24", *where) == []
            everything = conns(c, c.router, "--json", *where)
            assert len(conns(c, c.router, "--json", "--client", f"{c.client.ip}/32", "--state", "active",
                             *where)) == 2, everything
            summary = conns(c, c.router, "--json", "-s", *where)
            assert summary["connections"] == 2 and summary["by_state"] == {"active": 2}
            assert summary["clients"] == 1 and sum(summary["by_target"].values()) == 2
            # The agent names the same four endpoints for its side of the connection.
            agent_view = conns(c, c.targets[0], "--json", "--side", "agent",
                               "--instance", pin_instance(c, c.targets[0]))
            assert len(agent_view) == 1
            for field in ("client_ip", "client_port", "service_ip", "forward_ip", "forward_port", "target_ip"):
                assert agent_view[0][field] == mine[0][field], field
            # Instances: the router's and the agents' pins, owned by live processes.
            instances = {i["name"]: i for i in conns(c, c.router, "--instances", "--json")["instances"]}
            assert instances[pin_instance(c, c.router)]["status"] == "running"
            assert instances[pin_instance(c, c.router)]["owner_pid"] == router.proc.pid
            assert instances[pin_instance(c, c.targets[1])]["role"] == "target"
        finally:
            for curl in curls:
                c.stop_process(curl)


def test_an_instance_whose_namespace_is_gone_is_listed_orphaned_and_removed(cluster):
    c = cluster(targets=1)
    ns = f"arrorphan{secrets.token_hex(3)}"
    instance = f"{c.id}-orphan"
    netlink.netns_create(ns)
    try:
        # A target datapath pinned from inside that namespace, by a process that then exits.
        code = ("from handoff.datapath import TargetDatapath; "
                f"TargetDatapath(bpf_dir={BPF_DIR!r}, instance={instance!r}, capacity=1024).close()")
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, timeout=60,
                       cwd=PROJECT_ROOT, capture_output=True)
        listed = {i["name"]: i for i in conns(c, c.router, "--instances", "--json")["instances"]}
        assert listed[instance]["status"] == "stopped"  # the namespace lives: a restart could use it
        untouched = conns(c, c.router, "--instances", "--remove-orphaned", "--json")
        assert instance not in untouched["removed"]
        netlink.netns_delete(ns)
        assert wait_for(lambda: {i["name"]: i for i in conns(c, c.router, "--instances", "--json")["instances"]}
                        [instance]["status"] == "orphaned", 5)
        result = conns(c, c.router, "--instances", "--remove-orphaned", "--json")
        assert instance in result["removed"]
        assert not (Path(BPF_DIR) / instance).exists()
        assert not (OWNERS_DIR / f"{instance}.json").exists()
    finally:
        netlink.netns_delete(ns)
        shutil.rmtree(Path(BPF_DIR) / instance, ignore_errors=True)
        (OWNERS_DIR / f"{instance}.json").unlink(missing_ok=True)
