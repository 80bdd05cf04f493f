"""The Grafana dashboard and the Prometheus alert rules in contrib/ name only
metrics that a real router and a real agent export (scraped after traffic of
every kind they chart: handoffs, a take-back, a client error)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from arr.testbed.router import handoff_cluster, parse_exposition

pytestmark = pytest.mark.net

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "arr-dashboard.json"
ALERTS = ROOT / "contrib" / "prometheus" / "arr-alerts.yml"
METRIC = re.compile(r"\barr_[a-z][a-z_]*[a-z]\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_expressions() -> list[str]:
    # The rules file is YAML; its expressions are the `expr:` values (folded
    # ones continue on more-indented lines).
    exprs, current = [], None
    for line in ALERTS.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("expr:"):
            current = [stripped[len("expr:"):].strip().lstrip(">").strip()]
            exprs.append(current)
        elif current is not None and stripped and not re.match(r"^[a-z_]+:", stripped):
            current.append(stripped)
        else:
            current = None
    return [" ".join(parts) for parts in exprs]


def base_name(metric: str) -> str:
    for suffix in SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def exported(text: str) -> set[str]:
    """Every metric family of an exposition, by its # TYPE line."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_the_files_are_well_formed_and_use_arr_metrics():
    assert len(dashboard_expressions()) >= 15
    alerts = alert_expressions()
    assert len(alerts) == ALERTS.read_text().count("- alert:") >= 8
    assert all(METRIC.search(e) for e in alerts)


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(cluster):
    c = cluster(targets=2, files={"1m": 1 << 20})
    info = c.files["1m"]
    with handoff_cluster(c) as (router, agents):
        router.wait_healthy()
        # A handoff, then a take-back on the same connection (keep-alive), and a client error.
        c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-o", "/dev/null",
                          router.url + info.url_path, router.url + info.url_path], check=True)
        code = ("import socket; s = socket.create_connection(('%s', 80)); "
                "s.sendall(b'GET /x HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 1\\r\\n"
                "Transfer-Encoding: chunked\\r\\n\\r\\n'); print(s.recv(100))" % c.vip)
        c.exec(c.client, ["python3", "-c", code], check=True)
        router_text = router.metrics_text()
        agent_texts = [a.metrics() for a in agents]
        agent_families = set()
        for agent in agents:
            agent_families |= exported(c.exec(agent.host, [
                "curl", "-sS", "--noproxy", "*", "http://127.0.0.1:9101/metrics"], check=True).stdout)
    families = exported(router_text) | agent_families
    used = {m for e in dashboard_expressions() + alert_expressions() for m in METRIC.findall(e)}
    missing = sorted(m for m in used if base_name(m) not in families and m not in families)
    assert not missing, f"dashboard/alerts use metrics nobody exports: {missing}"
    # And the traffic above shows in the families the dashboard charts.
    samples = parse_exposition(router_text)
    def total(name: str) -> float:
        return sum(v for k, v in samples.items() if k.split("{")[0] == name)
    assert total("arr_handoffs_total") >= 2
    assert total("arr_client_errors_total") >= 1
    assert total("arr_requests_total") >= 2
    assert any(k.startswith("arr_agent_entries") for t in agent_texts for k in t)
