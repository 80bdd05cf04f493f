"""arr/metrics.py: the children the hot paths count on (``Children``)."""

from __future__ import annotations

from arr.metrics import Metrics


def test_children_are_the_metrics_own_and_looked_up_once_per_label_values() -> None:
    metrics = Metrics()
    child = metrics.requests_of("handoff", "", "t1")
    assert metrics.requests_of("handoff", "", "t1") is child
    assert child is metrics.requests.labels("handoff", "", "t1")
    child.inc()
    metrics.requests_of("handoff", "", "t1").inc(2)
    metrics.requests_of("proxy", "200", "t1").inc()
    assert metrics.value("arr_requests_total", {"decision": "handoff", "status": "", "target": "t1"}) == 3
    assert metrics.value("arr_requests_total", {"decision": "proxy", "status": "200", "target": "t1"}) == 1
    metrics.latency_of("handoff").observe(0.001)
    assert metrics.value("arr_request_duration_seconds_count", {"decision": "handoff"}) == 1
