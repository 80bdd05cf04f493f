"""The loss-tail benchmark's pure parts (benchmarks/loss_tail.py): its summary
of request times per system and the table it prints."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from benchmarks.loss_tail import summarize, render


def test_the_summary_counts_runs_and_requests_over_the_bound():
    s = summarize("arr-nat", [[0.01, 2.5, 0.2], [0.3, 0.1], [2.1, 3.0]], bound=2.0)
    assert s.requests == 7
    assert s.slowest_per_run == (2.5, 0.3, 3.0)
    assert (s.runs_over_bound, s.requests_over_bound) == (2, 3)
    assert s.p50 == 0.3


def test_a_request_at_the_bound_is_not_over_it():
    s = summarize("direct", [[2.0, 1.0]], bound=2.0)
    assert (s.runs_over_bound, s.requests_over_bound) == (0, 0)


def test_no_times_is_an_error_naming_the_system():
    with pytest.raises(ValueError, match="haproxy"):
        summarize("haproxy", [[], []])


@given(st.lists(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=50), min_size=1, max_size=6))
def test_quantiles_are_ordered_and_within_the_slowest(runs):
    s = summarize("x", runs)
    assert s.p50 <= s.p99 <= s.p999 <= max(s.slowest_per_run)
    assert s.requests_over_bound >= s.runs_over_bound


def test_the_table_has_a_row_per_system_with_its_figures():
    table = render([summarize("direct", [[0.001, 4.6]]), summarize("arr-nat", [[0.003, 1.57]])], 20)
    lines = table.splitlines()
    assert lines[0].endswith("2% loss each way on client and targets")
    assert lines[2].startswith("| system | runs | requests | runs with one > 2 s |")
    assert lines[4].startswith("| direct | 1 | 2 | 1 | 1 |") and lines[4].endswith("| 4.60 |")
    assert lines[5].startswith("| arr-nat | 1 | 2 | 0 | 0 |") and lines[5].endswith("| 1.57 |")
