"""Network test bed: namespaces, veths, a bridge, nginx targets and a client.

Usage::

    from arr.testbed import Cluster, ClusterSpec

    with Cluster(ClusterSpec(targets=2, topology="gateway")) as c:
        r = c.curl(c.target_url(0, c.files["1m"].url_path))
        assert r.status == 200 and r.sha256 == c.files["1m"].sha256
"""

from arr.netlink import Counters
from arr.testbed.cluster import (
    NS_PREFIX,
    Cluster,
    ClusterSpec,
    CommandError,
    CurlResult,
    Host,
    TestbedError,
    cleanup_stale,
)
from arr.testbed.files import FileInfo

__all__ = [
    "NS_PREFIX",
    "Cluster",
    "ClusterSpec",
    "CommandError",
    "Counters",
    "CurlResult",
    "FileInfo",
    "Host",
    "TestbedError",
    "cleanup_stale",
]
