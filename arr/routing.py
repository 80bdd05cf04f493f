"""From a validated ``Config`` to the objects the router runs: pools and a policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Union

from arr.decisions import Decision, Local, LocalResponse
from arr.policies import make_balancer
from arr.policies.rules import Rule, RoutingPolicy
from arr.pool import Pool

if TYPE_CHECKING:
    from arr.config import Config, LocalRoute
    from arr.request import Request

Policy = Callable[["Request"], Union[Decision, Awaitable[Decision]]]


@dataclass
class Routing:
    pools: dict[str, Pool]
    policy: Policy


def build_pools(config: "Config") -> dict[str, Pool]:
    return {
        p.name: Pool.of(p.name, p.targets, make_balancer(p.policy, dict(p.policy_options)), p.health)
        for p in config.pools
    }


def local_handler(route: "LocalRoute") -> Callable[["Request"], LocalResponse]:
    response = LocalResponse(route.status, route.body, (("content-type", route.content_type),))
    return lambda request: response


def with_local_routes(policy: Policy, routes: dict[str, Callable[["Request"], LocalResponse]]) -> Policy:
    """Exact-path local answers win over the policy (router health, small objects)."""
    if not routes:
        return policy
    decisions = {path: Local(handler) for path, handler in routes.items()}

    def routed(request: "Request") -> Union[Decision, Awaitable[Decision]]:
        local = decisions.get(request.path)
        return local if local is not None else policy(request)

    return routed


def build_routing(config: "Config") -> Routing:
    pools = build_pools(config)
    rules = [
        Rule(pool=r.pool, host=r.host, path_prefix=r.path_prefix, path_regex=r.path_regex,
             method=r.method, header=r.header, cookie=r.cookie, reject=r.reject,
             response_deadline=r.response_deadline)
        for r in config.rules
    ]
    mode = "handoff" if config.router.mode == "nat" else "proxy"
    policy: Policy = RoutingPolicy(rules, pools, config.default_pool, mode)
    routes = {route.path: local_handler(route) for route in config.local}
    if config.router.health_path:
        routes.setdefault(config.router.health_path,
                          lambda request: LocalResponse(200, b"ok\n"))
    return Routing(pools, with_local_routes(policy, routes))
