"""What a configuration reload (SIGHUP, ``arr reload``) changes, decided
without I/O.

A reload must not drop a connection nor lose what the router knows about its
targets: a target that stays (same pool, same address) keeps its
``TargetState`` object, so its health, drain flag, run-time weight, requests
in flight and handed-off count carry over, and the exchanges running on it
finish against the same object. Its ``Target`` (weight, agent, name) is
replaced in place. New targets start as the configuration builds them;
removed ones leave the pools, their in-flight exchanges finish on the
objects they hold.

Some settings need a restart (the listening address, the mode, the metrics
address, the [handoff] data path): a reload keeps their old values and says
so; it does not fail for them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from arr.config import Config
    from arr.pool import Pool

RESTART_ONLY = ("router.listen", "router.mode", "router.metrics", "router.admin_socket", "handoff")


@dataclass(frozen=True)
class ReloadPlan:
    config: "Config"
    """The configuration to run: the new one, with the restart-only settings of the old."""
    kept: tuple[str, ...]
    """Targets (pool/name) whose state carried over."""
    added: tuple[str, ...]
    removed: tuple[str, ...]
    needs_restart: tuple[str, ...]
    """Settings that changed in the file but keep their old value until a restart."""

    def summary(self) -> dict[str, object]:
        return {"kept": list(self.kept), "added": list(self.added), "removed": list(self.removed),
                "needs_restart": list(self.needs_restart)}


def restart_only_changes(old: "Config", new: "Config") -> list[str]:
    changed = []
    for key in RESTART_ONLY:
        section, _, field = key.partition(".")
        before, after = getattr(old, section), getattr(new, section)
        if field:
            before, after = getattr(before, field), getattr(after, field)
        if before != after:
            changed.append(key)
    return changed


def effective_config(old: "Config", new: "Config") -> "Config":
    """NEW with the restart-only settings of OLD."""
    router = replace(new.router, listen=old.router.listen, mode=old.router.mode, metrics=old.router.metrics,
                     admin_socket=old.router.admin_socket)
    return replace(new, router=router, handoff=old.handoff)


def carry_over(old_pools: dict[str, "Pool"], new_pools: dict[str, "Pool"]
               ) -> tuple[list[str], list[str], list[str]]:
    """Put the surviving ``TargetState`` objects of OLD_POOLS into NEW_POOLS
    (in place); return (kept, added, removed) as 'pool/target' names."""
    kept, added = [], []
    for name, pool in new_pools.items():
        before = old_pools.get(name)
        by_address = {m.target.address: m for m in before.members} if before else {}
        for index, member in enumerate(pool.members):
            survivor = by_address.pop(member.target.address, None)
            if survivor is None:
                added.append(f"{name}/{member.name}")
                continue
            survivor.target = member.target
            pool.members[index] = survivor
            kept.append(f"{name}/{member.name}")
    removed = [f"{name}/{m.name}" for name, pool in old_pools.items() for m in pool.members
               if not any(m is n for p in new_pools.values() for n in p.members)]
    return kept, added, removed


def plan_reload(old: "Config", new: "Config", old_pools: dict[str, "Pool"], new_pools: dict[str, "Pool"]
                ) -> ReloadPlan:
    """Decide the reload; NEW_POOLS (built from NEW) receive the carried-over states."""
    kept, added, removed = carry_over(old_pools, new_pools)
    return ReloadPlan(config=effective_config(old, new), kept=tuple(kept), added=tuple(added),
                      removed=tuple(removed), needs_restart=tuple(restart_only_changes(old, new)))
