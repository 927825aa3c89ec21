"""An asyncio client of etcd's v3 API (KV, Lease, Watch) over grpcio aio.

Why our own client rather than a library: the maintained async Python clients of etcd v3
either pin old grpcio/protobuf majors or wrap a sync client in threads; what SciStream needs
(get/put/delete/txn, leases, one prefix watch) is a thin layer over etcd's stable v3 protos,
compiled from the pinned copy in proto/etcd/ like the project's own.

Failover: one channel per endpoint; a call starts on the member that last answered and moves
round robin to the next when a member cannot be reached, has no leader, or does not answer
within its share of the deadline. Every call carries the "hasleader" metadata, so a member
cut off from its quorum refuses at once instead of waiting for an election that cannot
happen. The whole call is bounded by ``timeout`` and then fails with EtcdUnavailable.

Writes that are not idempotent (txn) are only retried on another member when the first
certainly did not apply them (no connection, or refused for want of a leader); otherwise the
caller gets EtcdUnavailable and must re-read, since a lost reply may hide an applied txn.

A client's channels are made on its first call and belong to that event loop; close() ends
the calls and watches in flight with an EtcdError.

TLS: https:// endpoints (all of a client's, or none) are reached over TLS, checked against
the CA of ``EtcdTls`` (the system's roots without one); its client certificate and key are
presented to a cluster that runs with ``--client-cert-auth``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc

from scistream._proto.etcd import rpc_pb2, rpc_pb2_grpc
from scistream.endpoints import url_uses_tls
from scistream.etcd.types import (
    Compare,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Op,
    TxnResult,
    WatchEvent,
    prefix_end,
    txn_result,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# etcd's interceptor refuses a call carrying this with "etcdserver: no leader" when the member
# has no leader, and cancels such a watch when its member loses the leader.
_METADATA = (("hasleader", "true"),)
# Sub-second reconnects, so a restarted member is used again quickly (gRPC's default backoff
# grows to two minutes); keepalive finds a silently dead member under an idle watch.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),  # etcd's default --grpc-keepalive-min-time is 5 s
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Details of an UNAVAILABLE that prove the request was never applied: refused by the
# interceptor before any proposal, or never sent because no connection exists.
_NOT_APPLIED = (
    "etcdserver: no leader",
    "etcdserver: not capable",
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
)
_MIN_ATTEMPT_S = 0.25
_ROUND_PAUSE_S = 0.05


@dataclass(frozen=True)
class EtcdTls:
    """TLS to the members of https:// endpoints: PEM bytes, each optional."""

    ca: bytes | None = None  # the roots that sign the members' certificates; None: the system's
    cert: bytes | None = None  # this client's certificate chain (with key), for client-cert-auth
    key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("an etcd client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


@dataclass
class _Member:
    name: str  # "host:port", as in messages
    channel: Any
    kv: Any
    lease: Any
    watch: Any


def parse_endpoint(endpoint: str) -> str:
    """``http(s)://host:port``, ``host:port`` or ``host`` -> gRPC target ``host:port``."""
    text = endpoint.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {endpoint!r}: only http:// and https:// endpoints are supported")
    if not parts.hostname or parts.path:
        raise ValueError(f"etcd endpoint {endpoint!r} is not http(s)://HOST:PORT")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"etcd endpoint {endpoint!r} has a bad port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def _not_applied(exc: grpc.aio.AioRpcError) -> bool:
    details = (exc.details() or "").lower()
    return any(marker in details for marker in _NOT_APPLIED)


class EtcdClient:
    """See the module docstring; every method raises EtcdError (EtcdUnavailable, EtcdCompacted)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 2.0, tls: EtcdTls | None = None) -> None:
        if not endpoints:
            raise ValueError("etcd client needs at least one endpoint")
        if timeout <= 0:
            raise ValueError("etcd client timeout must be positive")
        self._targets = [parse_endpoint(e) for e in endpoints]
        schemes = {url_uses_tls(e) for e in endpoints}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints mix http:// and https://: one cluster speaks one of them")
        if schemes == {True}:
            self._tls: EtcdTls | None = tls or EtcdTls()
        elif tls is not None:
            raise ValueError("TLS settings for etcd need https:// endpoints")
        else:
            self._tls = None
        self._timeout = timeout
        self._members: list[_Member] | None = None  # made in the running loop, on first use
        self._current = 0
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return list(self._targets)

    def _names(self) -> str:
        return ", ".join(self._targets)

    def _member(self, i: int) -> _Member:
        if self._closed:
            raise EtcdError(f"the etcd client for {self._names()} is closed")
        if self._members is None:
            members = []
            for target in self._targets:
                ch = (
                    grpc.aio.secure_channel(target, self._tls.credentials(), options=_CHANNEL_OPTIONS)
                    if self._tls
                    else grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
                )
                members.append(
                    _Member(
                        target,
                        ch,
                        rpc_pb2_grpc.KVStub(ch),
                        rpc_pb2_grpc.LeaseStub(ch),
                        rpc_pb2_grpc.WatchStub(ch),
                    )
                )
            self._members = members
        return self._members[i]

    def _raise_if_closed(self) -> None:
        """close() cancels the calls in flight: tell their callers the client is closed, rather
        than let a CancelledError out of a task that nobody cancelled."""
        task = asyncio.current_task()
        if self._closed and (task is None or task.cancelling() == 0):
            raise EtcdError(f"the etcd client for {self._names()} was closed during the call") from None

    def _failed(self, i: int) -> None:
        # Move on only if no concurrent call has already moved on from this member.
        if self._current == i:
            self._current = (i + 1) % len(self._targets)

    async def _why_unreachable(self, m: _Member) -> str:
        """What gRPC last saw connecting to m (refused, a TLS handshake that failed, ...): a
        read of nothing, which on a channel in TRANSIENT_FAILURE fails at once, unsent."""
        try:
            await m.kv.Range(rpc_pb2.RangeRequest(key=b"\0", limit=1), timeout=0.2, metadata=_METADATA)
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() or exc.code().name
            # "failed to connect to all addresses; last error: UNKNOWN: ipv4:H:P: <why>"
            return detail.rsplit(f"{m.name}: ", 1)[-1] if m.name in detail else detail
        except asyncio.CancelledError:
            self._raise_if_closed()
            raise
        return "it answers now"

    async def _connected(self, m: _Member, until: float) -> bool:
        """Wait until m's channel is READY, at most until ``until``; False when it failed
        to connect (TRANSIENT_FAILURE: nothing was sent) or did not connect in time."""
        loop = asyncio.get_running_loop()
        state = m.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                return False
            left = until - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(m.channel.wait_for_state_change(state), left)
            except TimeoutError:
                return False
            state = m.channel.get_state(try_to_connect=True)
        return True

    async def _call(
        self, what: str, attempt: Callable[[_Member, float], Awaitable[T]], *, idempotent: bool = True
    ) -> T:
        """Run ``attempt(member, timeout)`` on one member after the other until one answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        share = max(self._timeout / 2, _MIN_ATTEMPT_S)
        last = "no member was tried"
        tried = 0
        while (left := deadline - loop.time()) > 0:
            if tried and tried % len(self._targets) == 0:
                # A whole round failed (e.g. an election is under way): pause before the next.
                await asyncio.sleep(min(_ROUND_PAUSE_S * (tried // len(self._targets)), 0.25, left))
                left = deadline - loop.time()
                if left <= 0:
                    break
            i = self._current
            m = self._member(i)
            tried += 1
            if not await self._connected(m, loop.time() + min(left, share)):
                last = f"{m.name} cannot be reached"
                if m.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    last += f" ({await self._why_unreachable(m)})"
                self._failed(i)
                continue
            left = deadline - loop.time()
            try:
                return await attempt(m, min(left, share) if idempotent else left)
            except asyncio.CancelledError:
                self._raise_if_closed()
                raise
            except grpc.aio.AioRpcError as exc:
                detail = exc.details() or exc.code().name
                if exc.code() not in _FAILOVER_CODES:
                    raise EtcdError(f"etcd at {m.name} refused the {what}: {detail}") from None
                last = f"{m.name}: {detail}"
                log.debug("etcd %s on %s failed (%s); trying the next member", what, m.name, detail)
                self._failed(i)
                if not idempotent and not _not_applied(exc):
                    raise EtcdUnavailable(
                        f"etcd at {self._names()} did not confirm the {what}, whose outcome is"
                        f" unknown: {last}"
                    ) from None
        raise EtcdUnavailable(
            f"etcd at {self._names()} has no quorum or cannot be reached"
            f" ({what} gave up after {self._timeout:g} s): {last}"
        )

    async def get(
        self, key: bytes, *, prefix: bool = False, keys_only: bool = False
    ) -> tuple[list[KeyValue], int]:
        """The key (or every key under the prefix) and the store's revision; linearizable."""
        req = rpc_pb2.RangeRequest(key=key, range_end=prefix_end(key) if prefix else b"", keys_only=keys_only)

        async def attempt(m: _Member, t: float) -> tuple[list[KeyValue], int]:
            resp = await m.kv.Range(req, timeout=t, metadata=_METADATA)
            return [KeyValue.from_pb(kv) for kv in resp.kvs], resp.header.revision

        return await self._call("get", attempt)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        req = rpc_pb2.PutRequest(key=key, value=value, lease=lease)

        async def attempt(m: _Member, t: float) -> int:
            resp = await m.kv.Put(req, timeout=t, metadata=_METADATA)
            return int(resp.header.revision)

        return await self._call("put", attempt)

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        req = rpc_pb2.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")

        async def attempt(m: _Member, t: float) -> int:
            resp = await m.kv.DeleteRange(req, timeout=t, metadata=_METADATA)
            return int(resp.header.revision)

        return await self._call("delete", attempt)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        req = rpc_pb2.TxnRequest(
            compare=[c.to_pb() for c in compare],
            success=[o.to_pb() for o in success],
            failure=[o.to_pb() for o in failure],
        )

        async def attempt(m: _Member, t: float) -> TxnResult:
            return txn_result(await m.kv.Txn(req, timeout=t, metadata=_METADATA))

        return await self._call("transaction", attempt, idempotent=False)

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id. (A retried grant may leave an unused lease
        behind, which expires after its TTL: harmless.)"""
        req = rpc_pb2.LeaseGrantRequest(TTL=ttl)

        async def attempt(m: _Member, t: float) -> int:
            resp = await m.lease.LeaseGrant(req, timeout=t, metadata=_METADATA)
            if resp.error:
                raise EtcdError(f"etcd at {m.name} refused the lease grant: {resp.error}")
            return int(resp.ID)

        return await self._call("lease grant", attempt)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease once; its remaining TTL in seconds, 0 when the lease is gone."""
        req = rpc_pb2.LeaseKeepAliveRequest(ID=lease_id)

        async def attempt(m: _Member, t: float) -> int:
            call = m.lease.LeaseKeepAlive(timeout=t, metadata=_METADATA)
            try:
                await call.write(req)
                await call.done_writing()
                resp = await call.read()
            finally:
                call.cancel()
            if resp is grpc.aio.EOF:
                # The stream ended without an answer: as good as unreachable; try the next.
                raise _closed_stream()
            return max(int(resp.TTL), 0)

        return await self._call("lease keepalive", attempt)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease (its keys are deleted); a lease already gone is not an error."""
        req = rpc_pb2.LeaseRevokeRequest(ID=lease_id)

        async def attempt(m: _Member, t: float) -> None:
            try:
                await m.lease.LeaseRevoke(req, timeout=t, metadata=_METADATA)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call("lease revoke", attempt)

    async def _open_watch(self, prefix: bytes, start_revision: int) -> tuple[_Member, Any]:
        create = rpc_pb2.WatchRequest(
            create_request=rpc_pb2.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix), start_revision=start_revision
            )
        )

        async def attempt(m: _Member, t: float) -> tuple[_Member, Any]:
            call = m.watch.Watch(metadata=_METADATA)
            try:
                await call.write(create)
                resp = await asyncio.wait_for(call.read(), t)
            except TimeoutError:
                call.cancel()
                raise _timed_out() from None
            except BaseException:
                call.cancel()
                raise
            if resp is grpc.aio.EOF:
                call.cancel()
                raise _closed_stream()
            if resp.compact_revision:
                call.cancel()
                raise _compacted(m.name, start_revision, resp.compact_revision)
            if not resp.created or resp.canceled:
                call.cancel()
                raise EtcdError(f"etcd at {m.name} refused the watch: {resp.cancel_reason or 'not created'}")
            return m, call

        return await self._call("watch", attempt)

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under ``prefix`` from ``start_revision`` on, in revision order.

        Raises EtcdUnavailable when the stream breaks or its member loses its leader, and
        EtcdCompacted when ``start_revision`` is compacted; re-watch from the last revision
        seen + 1 to miss nothing.
        """
        m, call = await self._open_watch(prefix, start_revision)
        try:
            while True:
                try:
                    resp = await call.read()
                except asyncio.CancelledError:
                    self._raise_if_closed()
                    raise
                except grpc.aio.AioRpcError as exc:
                    raise EtcdUnavailable(
                        f"etcd watch on {m.name} (of {self._names()}) broke:"
                        f" {exc.details() or exc.code().name}"
                    ) from None
                if resp is grpc.aio.EOF:
                    raise EtcdUnavailable(f"etcd at {m.name} (of {self._names()}) closed the watch")
                if resp.compact_revision:
                    raise _compacted(m.name, start_revision, resp.compact_revision)
                if resp.canceled:
                    raise EtcdUnavailable(
                        f"etcd at {m.name} (of {self._names()}) cancelled the watch:"
                        f" {resp.cancel_reason or 'no reason given'}"
                    )
                if resp.events:
                    yield [WatchEvent.from_pb(ev) for ev in resp.events]
        finally:
            call.cancel()

    async def close(self) -> None:
        self._closed = True
        members, self._members = self._members, None
        for m in members or []:
            await m.channel.close()


class _StreamError(grpc.aio.AioRpcError):
    """A stream failure we detect ourselves, shaped like gRPC's so _call fails over on it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _closed_stream() -> _StreamError:
    return _StreamError(grpc.StatusCode.UNAVAILABLE, "the member closed the stream without an answer")


def _timed_out() -> _StreamError:
    return _StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer before the deadline")


def _compacted(name: str, start: int, compact_revision: int) -> EtcdCompacted:
    return EtcdCompacted(
        f"etcd at {name} has compacted its history up to revision {compact_revision},"
        f" past the watch's start revision {start}",
        compact_revision,
    )
