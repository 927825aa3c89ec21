"""Fixtures of the multi-node gateway tests (issue 12): a real etcd cluster on loopback."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from etcd_cluster import ETCD, EtcdCluster

log = logging.getLogger(__name__)


@pytest.fixture
def etcd_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EtcdCluster]:
    """A healthy 3-member etcd cluster (client ports in ``.endpoints``), killed and removed
    after the test; on a failure the members' last log lines go into the report."""
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"{ETCD} is missing: install Debian's etcd-server (./dev setup does)")
    cluster = EtcdCluster(3, parent=tmp_path_factory.getbasetemp())
    try:
        cluster.start_all()
        yield cluster
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            log.error("etcd member logs:\n%s", cluster.logs_text())
    finally:
        cluster.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Keep each phase's report on the item so the fixture's teardown can tell a failed test.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
