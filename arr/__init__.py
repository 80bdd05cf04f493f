"""arr: layer-7 request routing with direct server return.

The pieces a program embedding arr needs are importable from here::

    import arr
    router = arr.Router(config, policy=my_policy)
"""

from arr.config import Config, ConfigError, Limits, RouterSettings, Upstream, load_config
from arr.decisions import Decision, Handoff, Local, LocalResponse, Proxy, Reject
from arr.pool import HealthRule, Pool, Target, TargetState
from arr.request import Headers, Request
from arr.server import HandoffEngine, Router, run

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "Decision", "Handoff", "HandoffEngine", "Headers", "HealthRule",
    "Limits", "Local", "LocalResponse", "Pool", "Proxy", "Reject", "Request", "Router",
    "RouterSettings", "Target", "TargetState", "Upstream", "load_config", "run",
]
