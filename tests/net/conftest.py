"""Fixtures for the network test bed (tests that need root and namespaces).

* ``cluster``: a factory, ``cluster(targets=2, topology="gateway", ...)`` ->
  a started :class:`arr.testbed.Cluster`; every cluster it made is closed at
  teardown and checked to have left nothing behind.
* ``ns``: a bare namespace with only loopback up, for tests of one host's
  sockets (sock_diag, crafted segments); deleted at teardown.
* A session fixture removes namespaces left by a crashed earlier run
  (``arr.testbed.cleanup_stale``: only our prefix, never a live cluster).

Not root -> the tests fail loudly (CI runs as root); they never skip.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable, Iterator

import pytest

from arr import netlink
from arr.testbed import Cluster, ClusterSpec, cleanup_stale
from arr.testbed.router import remove_stale_pins

REQUIRED_TOOLS = ("ip", "curl", "/usr/sbin/nginx")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "net: needs root and network namespaces (arr.testbed)")


def _preflight() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "tests/net need root (network namespaces, veths, nginx in netns); "
            "run them as root: CI does. They are not skipped on purpose.",
            pytrace=False,
        )
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"tests/net need these tools installed: {missing}", pytrace=False)


@pytest.fixture(scope="session")
def netbed() -> Iterator[None]:
    """Root check + stale cleanup, once per session."""
    _preflight()
    removed = cleanup_stale()
    if removed:
        print(f"[arr.testbed] removed stale namespaces: {removed}")
    pins = remove_stale_pins()
    if pins:
        print(f"[arr.testbed] removed stale pinned maps: {pins}")
    yield


@pytest.fixture
def ns(netbed: None) -> Iterator[str]:
    name = f"arrns-{uuid.uuid4().hex[:8]}"
    netlink.netns_create(name)
    try:
        netlink.link_up(name, "lo")
        yield name
    finally:
        netlink.netns_delete(name)


@pytest.fixture
def cluster(netbed: None) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(spec: ClusterSpec | None = None, **kw) -> Cluster:
        c = Cluster(spec or ClusterSpec(**kw))
        made.append(c)
        return c.start()

    yield make

    errors = []
    for c in made:
        try:
            c.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    for c in made:
        assert not c.leftovers(), f"cluster {c.id} left behind: {c.leftovers()}"
    if errors:
        raise errors[0]
