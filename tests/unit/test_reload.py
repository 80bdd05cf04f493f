"""Reload planning (arr/reload.py): surviving targets keep their live state
object, restart-only settings keep their old values and are named."""

from __future__ import annotations

from arr.config import config_from_dict
from arr.reload import plan_reload
from arr.routing import build_pools


def config(targets, *, listen="127.0.0.1:8080", weight=1, limits=None):
    data = {"router": {"listen": listen, "mode": "proxy"},
            "pools": {"web": {"targets": [{"address": a, "weight": weight} for a in targets]}}}
    if limits:
        data["limits"] = limits
    return config_from_dict(data)


def test_surviving_targets_keep_their_state_objects_and_new_ones_join():
    old = config(["10.0.0.1:80", "10.0.0.2:80"])
    old_pools = build_pools(old)
    survivor = old_pools["web"].find("10.0.0.2:80")
    survivor.healthy, survivor.draining, survivor.active, survivor.handed_off = False, True, 3, 7
    survivor.weight_override = 9
    new = config(["10.0.0.2:80", "10.0.0.3:80"], weight=5, limits={"max_connections": 77})
    new_pools = build_pools(new)
    plan = plan_reload(old, new, old_pools, new_pools)
    assert plan.kept == ("web/10.0.0.2:80",) and plan.added == ("web/10.0.0.3:80",)
    assert plan.removed == ("web/10.0.0.1:80",)
    carried = new_pools["web"].find("10.0.0.2:80")
    assert carried is survivor  # in-flight exchanges finish against the same object
    assert (carried.healthy, carried.draining, carried.active, carried.handed_off) == (False, True, 3, 7)
    assert carried.target.weight == 5 and carried.weight == 9  # the run-time weight wins until changed
    assert plan.config.limits.max_connections == 77 and plan.needs_restart == ()


def test_restart_only_settings_keep_their_old_values_and_are_named():
    old, new = config(["10.0.0.1:80"]), config(["10.0.0.1:80"], listen="127.0.0.1:9090")
    plan = plan_reload(old, new, build_pools(old), build_pools(new))
    assert plan.needs_restart == ("router.listen",)
    assert plan.config.router.listen == ("127.0.0.1", 8080)
    assert plan.summary()["needs_restart"] == ["router.listen"]
