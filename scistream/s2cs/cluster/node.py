"""Assembling one gateway node of a cluster: etcd client, cluster key, lease, watched copy.

Start order (server.py calls these): ``join`` (the cluster key opens, etcd answers,
this node's name is free or its own, the copy of the keys is read) → ``manager``
(the ClusterManager over them) → ``start`` (lease renewal; the manager's own loops
start with it). ``close`` stops renewing without revoking the lease: routes keep
flowing and a restart within the TTL takes the lease over.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scistream.endpoints import url_uses_tls
from scistream.etcd import EtcdClient, EtcdError, EtcdTls, EtcdUnavailable
from scistream.s2cs.cluster.layout import Keyspace, NodeInfo, Sealer
from scistream.s2cs.cluster.manager import ClusterManager
from scistream.s2cs.cluster.membership import Membership, MembershipError
from scistream.s2cs.cluster.view import ClusterView
from scistream.s2cs.clusterkey import ClusterKeyError, load_cluster_key
from scistream.s2cs.config import ServerConfig, default_node_name
from scistream.s2cs.store import Instance, write_marker

#: Deadline of every etcd call (s): a request fails within it when etcd has no quorum.
ETCD_TIMEOUT_S = 1.5


class ClusterStartError(Exception):
    """This node cannot join its cluster; one sentence for the operator."""


def etcd_tls(config: ServerConfig) -> EtcdTls | None:
    """The TLS settings of https:// etcd URLs, files read (preflight checked them)."""
    if not any(url_uses_tls(url) for url in config.etcd):
        return None
    blobs: dict[str, bytes | None] = {}
    for option, path in (("--etcd-ca", config.etcd_ca), ("--etcd-cert", config.etcd_cert),
                         ("--etcd-key", config.etcd_key)):
        try:
            blobs[option] = Path(path).read_bytes() if path else None
        except OSError as exc:
            raise ClusterStartError(f"cannot read {option} {path}: {exc.strerror}") from None
    return EtcdTls(ca=blobs["--etcd-ca"], cert=blobs["--etcd-cert"], key=blobs["--etcd-key"])


class ClusterNode:
    def __init__(self, config: ServerConfig, instance: Instance) -> None:
        self.config = config
        self.instance = instance
        try:
            key = load_cluster_key(config.etcd_key_file)
        except ClusterKeyError as exc:
            raise ClusterStartError(str(exc)) from None
        self.keys = Keyspace(config.etcd_prefix)
        self.sealer = Sealer(key)
        self.tls = etcd_tls(config)
        self.etcd = EtcdClient(list(config.etcd), timeout=ETCD_TIMEOUT_S, tls=self.tls)
        lo, hi = config.port_range
        self.me = NodeInfo(
            name=config.node_name or default_node_name(),
            instance=instance.instance_id,
            listener_ip=config.listener_ip,
            port_low=lo,
            port_high=hi,
            control=f"{config.bind}:{config.port}",
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.time(),
        )
        self.membership = Membership(self.etcd, self.keys, self.me, config.node_ttl)
        self.view = ClusterView(self.etcd, self.keys, self.sealer)
        self._manager: ClusterManager | None = None

    async def join(self) -> None:
        where = ", ".join(self.config.etcd)
        try:
            await self.membership.join()
            await self.view.load()
        except MembershipError as exc:
            raise ClusterStartError(str(exc)) from None
        except EtcdUnavailable as exc:
            hint = (
                "over TLS, check that --etcd-ca is the CA of the members' certificates and that "
                "etcd trusts the client certificate --etcd-cert"
                if self.tls
                else "if its members serve clients over TLS, give their https:// URLs"
            )
            raise ClusterStartError(f"cannot join the gateway cluster at {where}: {exc}; {hint}") from None
        except EtcdError as exc:
            raise ClusterStartError(f"cannot join the gateway cluster at {where}: {exc}") from None
        if not self.instance.store_existed:
            write_marker(self.config.state_dir, self.instance)

    def manager(self, config: ServerConfig, **parts: Any) -> ClusterManager:
        self._manager = ClusterManager(
            config,
            etcd=self.etcd,
            keys=self.keys,
            sealer=self.sealer,
            membership=self.membership,
            view=self.view,
            **parts,
        )
        self.membership.on_rejoin = self._manager.reconciler.resync
        return self._manager

    def start(self, on_membership_change: Callable[[bool], None]) -> None:
        self.membership.on_change = on_membership_change
        self.membership.start()
        self.view.start()

    async def close(self) -> None:
        await self.membership.stop()
        await self.view.stop()
        with contextlib.suppress(Exception):
            await self.etcd.close()
