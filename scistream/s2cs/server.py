"""Assembling and running one s2cs: state dir, store, backend, gRPC server, health.

Start order: state directory (0700, locked: one s2cs per directory) → store
(refused if it should exist and does not) → backend.start → reconcile stored
sessions with the data plane → events / metrics → gRPC server → health SERVING.
Health goes NOT_SERVING while the data plane is gone and is being brought back.
Stop (SIGTERM/SIGINT): health NOT_SERVING, stop taking RPCs, fail sessions still
waiting for a hello, leave routed sessions in the store and their routes running
(``backend.close()``; with the native backend s2ds keeps forwarding), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
from typing import Any

import grpc
import zmq
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scistream.s2cs import preflight
from scistream.s2cs.audit import AuditLog
from scistream.s2cs.auth import Authenticator, make_authenticator
from scistream.s2cs.backends import UnknownBackendSetting, create_backend
from scistream.s2cs.backends.base import Backend, BackendOptions
from scistream.s2cs.cluster.node import ClusterNode, ClusterStartError
from scistream.s2cs.config import ServerConfig, listener_ip_problem
from scistream.s2cs.events import EventPublisher, EventsConfigError, EventsCurve
from scistream.s2cs.manager import SessionManager
from scistream.s2cs.metrics import Metrics
from scistream.s2cs.ports import PortAllocator
from scistream.s2cs.servicer import ControlServicer, add_to_server
from scistream.s2cs.store import (
    Instance,
    SessionStore,
    StateDirLock,
    StateError,
    ensure_private_dir,
    load_instance,
    open_store,
)
from scistream.s2cs.targets import TargetPolicy

log = logging.getLogger(__name__)

SERVICE_NAME = "scistream.Control"


class StartupError(Exception):
    """s2cs cannot start; the message is one sentence for the operator."""


class S2CSServer:
    def __init__(
        self,
        config: ServerConfig,
        *,
        backend: Backend | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.config = config
        self._backend_override = backend
        self._auth_override = authenticator
        self.port = 0
        self.manager: SessionManager | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._closers: list[Any] = []
        self._state_lock: StateDirLock | None = None
        self._store: SessionStore | None = None
        self._cluster: ClusterNode | None = None
        self._store_watch: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        problem = listener_ip_problem(cfg.listener_ip)
        if problem:
            raise StartupError(problem)
        try:
            ensure_private_dir(cfg.state_dir)
        except OSError as exc:
            raise StartupError(f"cannot create the state directory {cfg.state_dir}: {exc.strerror}") from None
        _warn_about_an_older_default_store(cfg)
        lock = StateDirLock(cfg.state_dir)
        try:
            lock.acquire()
            self._state_lock = lock  # released last in stop(), once the store is closed
            instance = load_instance(cfg.state_dir)
        except StateError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot use the state directory {cfg.state_dir}: {exc.strerror}") from None
        log.info("state directory %s (instance %s)", cfg.state_dir, instance.instance_id)
        try:
            backend = self._backend_override or create_backend(
                cfg.backend_type,
                BackendOptions(
                    state_dir=cfg.state_dir,
                    listener_ip=cfg.listener_ip,
                    s2ds_address=cfg.s2ds_address,
                    instance_id=instance.instance_id,
                    extra=dict(cfg.backend_extra),
                ),
            )
        except UnknownBackendSetting as exc:
            raise StartupError(str(exc)) from None
        except (ImportError, ValueError) as exc:
            raise StartupError(f"the {cfg.backend_type} backend is not available: {exc}") from None
        # A backend/security pair that can never work is refused now, not at each session.
        if cfg.compat_allowed and "compat" not in backend.security_modes:
            raise StartupError(
                f"the {backend.name} backend cannot run the SciStream 1.x compat mode "
                "(--security compat / --scistream1-compat): it cannot use a pre-shared key; "
                "use --type native or stunnel for it, or certificates between gateways "
                "(README, 'Compared with SciStream 1.x')"
            )
        if cfg.default_security not in backend.security_modes:
            raise StartupError(
                f"the {backend.name} backend cannot carry --security {cfg.default_security}; "
                f"it carries {', '.join(sorted(backend.security_modes))}"
            )
        if (cfg.allowed_identities or cfg.allowed_domains) and not cfg.client_secret:
            log.warning(
                "--allowed-identity/--allowed-domain are ignored: without --client-secret no "
                "caller is authenticated, so there is no identity to check"
            )
        auth = self._auth_override or make_authenticator(
            cfg.client_id,
            cfg.client_secret,
            timeout=cfg.introspect_timeout,
            allowed_identities=cfg.allowed_identities,
            allowed_domains=cfg.allowed_domains,
            cache_ttl=cfg.token_cache_ttl,
        )
        creds = self._credentials() if cfg.ssl else None  # fail before anything starts
        store: SessionStore | None = None
        if cfg.clustered:
            self._cluster = await self._join_cluster(instance)
        else:
            try:
                store = open_store(cfg.state_dir, instance, fresh=cfg.fresh_state)
            except StateError as exc:
                raise StartupError(str(exc)) from None
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"cannot open the session store {cfg.db_path()}: {exc}") from None
            self._closers.append(store.close)
            self._store = store
            store.on_problem = self._store_problem
        try:
            audit = AuditLog(cfg.audit_path())
        except OSError as exc:
            raise StartupError(f"cannot open the audit log {cfg.audit_path()}: {exc.strerror}") from None
        self._closers.append(audit.close)
        metrics = Metrics()
        curve = None
        if cfg.events_curve_secret_file or cfg.events_curve_client_keys:
            if not (cfg.events_curve_secret_file and cfg.events_curve_client_keys):
                raise StartupError(
                    "CURVE events need both --events-curve-secret-file and --events-curve-client-keys"
                )
            curve = EventsCurve(cfg.events_curve_secret_file, cfg.events_curve_client_keys)
        try:
            events = EventPublisher(cfg.events_address(), curve=curve)
        except EventsConfigError as exc:
            raise StartupError(str(exc)) from None
        except (zmq.ZMQError, OSError) as exc:
            raise StartupError(f"cannot publish events on {cfg.events_address()!r}: {exc}") from None
        self._closers.append(events.close)
        if cfg.metrics_port is not None:
            try:
                metrics.serve(cfg.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on port {cfg.metrics_port}: {exc.strerror}"
                ) from None
            self._closers.append(metrics.close)
        policy = TargetPolicy(
            cfg.listener_ip, cfg.allow_targets, own_ports=[cfg.port, metrics.port, events.port]
        )
        lo, hi = cfg.port_range
        ports = PortAllocator(lo, hi, cfg.listener_ip)
        try:
            await backend.start()
        except Exception as exc:
            raise StartupError(f"the {backend.name} data plane could not start: {exc}") from None
        self._closers.insert(0, backend.close)
        manager: SessionManager
        if self._cluster is not None:
            manager = self._cluster.manager(
                cfg,
                backend=backend,
                ports=ports,
                policy=policy,
                events=events,
                audit=audit,
                metrics=metrics,
                auth_enabled=auth.enabled,
            )
        else:
            assert store is not None
            manager = SessionManager(
                cfg,
                backend=backend,
                ports=ports,
                policy=policy,
                store=store,
                events=events,
                audit=audit,
                metrics=metrics,
                auth_enabled=auth.enabled,
            )
        self.manager = manager
        manager.on_data_plane_change = self._refresh_health
        await manager.reconcile()

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 1 << 20),
                ("grpc.so_reuseport", 0),
                # A connection that stalls in its TLS handshake (or never sends the HTTP/2
                # preface) is closed after this, not after gRPC's default 120 s.
                ("grpc.server_handshake_timeout_ms", max(1, round(cfg.handshake_timeout * 1000))),
            ],
            maximum_concurrent_rpcs=None,
        )
        servicer = ControlServicer(manager, auth, lambda: {"events": events.endpoint, "metrics": metrics.url})
        add_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.bind}:{cfg.port}" if ":" not in cfg.bind else f"[{cfg.bind}]:{cfg.port}"
        try:
            if creds is not None:
                self.port = server.add_secure_port(address, creds)
            else:
                log.warning(
                    "the control channel is PLAINTEXT (--ssl False): tokens and session keys travel "
                    "unencrypted; use this only for testing"
                )
                self.port = server.add_insecure_port(address)
        except RuntimeError:
            raise StartupError(f"cannot listen on {address} (in use or not a local address)") from None
        if not self.port:
            raise StartupError(f"cannot listen on {address} (in use or not a local address)")
        policy.add_own_port(self.port)
        await server.start()
        self._server = server
        manager.start()
        if self._cluster is not None:
            self._cluster.start(self._on_membership_change)
        self._store_watch = asyncio.ensure_future(self._watch_store())
        self._closers.insert(0, self._store_watch.cancel)
        await self._set_health(self._serving_status())
        log.info(
            "s2cs %s listening on %s:%d (backend %s, security %s, data ports %d-%d on %s, events %s)",
            "TLS" if cfg.ssl else "plaintext",
            cfg.bind,
            self.port,
            backend.name,
            cfg.default_security,
            lo,
            hi,
            cfg.listener_ip,
            events.endpoint or "off",
        )

    def _credentials(self) -> grpc.ServerCredentials:
        cfg = self.config
        try:
            with open(cfg.server_crt, "rb") as f:
                crt = f.read()
            with open(cfg.server_key, "rb") as f:
                key = f.read()
        except OSError as exc:
            raise StartupError(
                f"cannot read the control-channel certificate or key ({exc.filename}: {exc.strerror}); "
                "give --server_crt and --server_key, or --ssl False for a plaintext test server"
            ) from None
        return grpc.ssl_server_credentials([(key, crt)])

    async def _join_cluster(self, instance: Instance) -> ClusterNode:
        cfg = self.config
        try:
            node = ClusterNode(cfg, instance)
            self._closers.append(node.close)
            await node.join()
        except ClusterStartError as exc:
            raise StartupError(str(exc)) from None
        return node

    def _on_membership_change(self, _valid: bool) -> None:
        if self._server is None or self._stopped.is_set():
            return
        asyncio.get_running_loop().create_task(self._refresh_health())

    def _serving_status(self) -> int:
        """SERVING only while the data plane answers and the store can be written (in a
        cluster: while this node's lease is confirmed)."""
        manager_ok = self.manager is None or self.manager.data_plane_ok
        store_ok = self._store is None or self._store.problem is None
        member_ok = self._cluster is None or self._cluster.membership.valid
        ok = manager_ok and store_ok and member_ok
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING

    async def _refresh_health(self) -> None:
        """Publish what _serving_status derives (called when either of its inputs changes)."""
        if self._server is not None and not self._stopped.is_set():
            await self._set_health(self._serving_status())

    def _store_problem(self, _problem: str | None) -> None:
        """The session store cannot be written (or can again): health says so at once."""
        if self._server is None or self._stopped.is_set():
            return
        asyncio.get_running_loop().create_task(self._refresh_health())

    async def _watch_store(self) -> None:
        """While the store cannot be written, try the state directory every 2 s, so health
        comes back (and requests are taken again) once the operator has fixed it."""
        while True:
            await asyncio.sleep(2.0)
            if self._store is not None and self._store.problem is not None:
                self._store.probe()  # a 64 KiB write, only while failing: fine on the loop

    async def _set_health(self, status: int) -> None:
        if self._health is not None:
            await self._health.set("", status)
            await self._health.set(SERVICE_NAME, status)

    async def stop(self, grace: float = 2.0) -> None:
        """Idempotent orderly stop (see module docstring)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.manager is not None:
            self.manager._closing = True
        if self._server is not None:
            # Pending reqs are failed by the manager below; give in-flight calls a moment.
            stop = asyncio.ensure_future(self._server.stop(grace))
            if self.manager is not None:
                await self.manager.shutdown()
            await stop
        elif self.manager is not None:
            await self.manager.shutdown()
        for close in self._closers:
            try:
                result = close()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, 10)
            except Exception as exc:
                log.error("error while stopping: %s", exc)
        self._closers.clear()
        if self._state_lock is not None:
            self._state_lock.release()
            self._state_lock = None
        log.info("s2cs stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _warn_about_an_older_default_store(cfg: ServerConfig) -> None:
    """Earlier releases kept every s2cs's store directly in the base state directory;
    an operator upgrading with default options should hear where its sessions are."""
    base = os.path.dirname(os.path.abspath(cfg.state_dir))
    if os.path.basename(cfg.state_dir.rstrip("/")) != str(cfg.port):
        return
    older = os.path.join(base, "s2cs.db")
    if os.path.exists(older) and not os.path.exists(cfg.db_path()):
        log.warning(
            "a session store of an earlier release is at %s, but this s2cs now keeps its state in "
            "%s (one directory per control port); start it with --state-dir %s to keep serving "
            "those sessions",
            older,
            cfg.state_dir,
            base,
        )


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; 0 on an orderly stop."""
    try:
        preflight.check(config)
    except preflight.PreflightError as exc:
        raise StartupError(str(exc)) from None
    server = S2CSServer(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    await stop_requested.wait()
    log.info("stopping on signal")
    await server.stop()
    return 0
