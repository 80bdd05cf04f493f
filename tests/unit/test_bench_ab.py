"""The A/B harness's pure parts (benchmarks/ab.py): the figures it takes from
one benchmark results.json and the table it prints."""

from __future__ import annotations

import pytest

from benchmarks.ab import RoundFigures, render, round_figures


def window(router_cpu_s: float, requests: int, agent_cpu_s: float | None = 0.5,
           router_user_s: float | None = None) -> dict:
    return {"requests": requests, "seconds": 5.0, "window_s": 5.0, "router_cpu_s": router_cpu_s,
            "agent_cpu_s": agent_cpu_s, "router_user_s": router_user_s}


def results(first: dict, same: dict, other: dict) -> dict:
    return {"raw": {"arr-nat": {"runs": [{"rehandoff": {"first": first, "same": same, "other": other}}]}}}


def test_figures_are_router_cpu_per_request_and_ratios_of_the_same_run():
    figures = round_figures("change", 2, results(window(4.0, 4000), window(3.0, 5000, None), window(6.0, 4000)))
    assert (figures.label, figures.round) == ("change", 2)
    assert figures.first_ms == pytest.approx(1.0)
    assert figures.same_ms == pytest.approx(0.6)
    assert figures.other_ms == pytest.approx(1.5)
    assert (figures.same_x, figures.other_x) == (pytest.approx(0.6), pytest.approx(1.5))
    assert figures.agents_first_ms == pytest.approx(0.125)
    assert figures.agents_same_ms is None  # not measured is not zero
    assert figures.user_other_x is None  # a results.json from before user time was recorded


def test_the_user_time_ratio_pairs_the_same_run_s_windows():
    figures = round_figures("base", 1, results(window(4.0, 4000, router_user_s=2.0), window(3.0, 5000),
                                               window(6.0, 4000, router_user_s=1.8)))
    assert figures.user_other_x == pytest.approx(0.9)  # 0.45 ms over 0.5 ms a request
    assert figures.other_x == pytest.approx(1.5)  # the goal's ratio stays on the whole CPU


def test_a_run_without_a_window_figure_is_an_error_naming_it():
    broken = results(window(4.0, 4000), window(3.0, 0), window(6.0, 4000))
    broken["errors"] = ["wrk failed"]
    with pytest.raises(ValueError, match=r"base round 1: .*window\(s\) same .*wrk failed"):
        round_figures("base", 1, broken)
    with pytest.raises(ValueError, match="first, same, other"):
        round_figures("base", 1, {"raw": {}})


def test_the_table_pairs_rounds_and_gives_medians_of_per_run_ratios():
    rows = [RoundFigures("change", 1, 1.0, 0.9, 1.2, None, None, None),
            RoundFigures("base", 1, 1.0, 1.0, 1.6, 0.5, 0.4, 0.4, 0.9),
            RoundFigures("base", 2, 2.0, 1.8, 3.0, 0.6, 0.5, 0.5, 0.7),
            RoundFigures("change", 2, 0.5, 0.5, 0.7, None, None, None),
            RoundFigures("base", 3, 1.0, 0.8, 1.4, 0.7, 0.6, 0.6, 0.8)]
    table = render(rows, "2a4fd55", "ac6c5c6")
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]  # past the header
    assert [line.split("|")[1:3] for line in lines] == [
        [" 1 ", " base "], [" 1 ", " change "], [" 2 ", " base "], [" 2 ", " change "], [" 3 ", " base "],
        [" median ", " base "], [" median ", " change "]]
    base_median = lines[-2].split("|")
    # per-run ratios 1.0, 0.9, 0.8 (same) and 1.6, 1.5, 1.4 (other): their medians
    assert (base_median[6].strip(), base_median[7].strip()) == ("0.90", "1.50")
    assert base_median[3].strip() == "1.000"  # median first ms
    assert base_median[8].strip() == "0.80"  # user time's other x, its median
    change_median = lines[-1].split("|")
    assert change_median[8].strip() == "–"  # user time not recorded
    assert change_median[9].strip() == "–/–/–"  # agents not measured
    assert "base 2a4fd55, change ac6c5c6" in table
