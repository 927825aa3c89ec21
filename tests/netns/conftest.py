"""Fixtures for tests that build the tutorial's four-host topology in network namespaces."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from scistream import netns

#: Every namespace these tests create starts with this, so the session can check
#: that none is left behind.
PREFIX = "sstt"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="network namespaces need root")
    for item in items:
        if "tests/netns" in str(item.fspath):
            item.add_marker(pytest.mark.root)
            if os.geteuid() != 0:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    netns.remove_stale(PREFIX)
    yield
    left = netns.list_namespaces(f"{PREFIX}{os.getpid()}-")
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def topo() -> Iterator[netns.Topology]:
    """A fresh four-host topology, removed on teardown even if the test failed."""
    with netns.Topology(PREFIX) as t:
        yield t
    assert not [n for n in netns.list_namespaces(PREFIX) if n.startswith(t.tag)]
