"""Who is calling: Globus Auth token introspection, cached, with an optional allow-list.

1.x clients send gRPC metadata ``authorization`` = the raw access token (we
tolerate a ``Bearer `` prefix) or the literal ``INVALID_TOKEN``. A server with
no client secret checks nothing and every caller is ``anonymous``.

With a secret, a token is accepted when Globus Auth's introspection says it is
active, not expired, carries the scope
``https://auth.globus.org/scopes/<client id>/scistream`` and names this client in
its audience (``active`` must be the JSON ``true``: ``"false"`` or ``1`` is refused).

Results are cached by SHA-256 of the token; the token itself is never stored or
logged. A positive result is kept at most ``cache_ttl`` seconds (default 60) and
never past the token's ``exp``, so a token revoked at Globus stops working here
within that time. A refusal is kept ``negative_ttl`` seconds (default 5), so a
caller repeating a bad token costs no further introspection. Introspections of
tokens not in the cache are rate-limited (a token bucket, ``introspect_rate``
per second with a burst of ``introspect_burst``) and at most
``introspect_concurrency`` run at once (each holds a thread for its HTTP call):
a flood of random tokens costs a bounded number of Globus calls and threads,
and a caller over the limit is told UNAVAILABLE (try again), never let in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from scistream.s2cs.errors import ControlError

log = logging.getLogger(__name__)

NO_TOKEN = "INVALID_TOKEN"  # what 1.x clients send when they have no token


@dataclass(frozen=True)
class Identity:
    sub: str
    username: str = ""

    def __str__(self) -> str:
        return f"{self.username} ({self.sub})" if self.username else self.sub


ANONYMOUS = Identity("anonymous")


def token_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            text = text.strip()
            if text[:7].lower() == "bearer ":
                text = text[7:].strip()
            return text or None
    return None


class Authenticator:
    """The no-check authenticator: every caller is anonymous."""

    enabled = False

    async def authenticate(self, token: str | None) -> Identity:
        return ANONYMOUS

    def close(self) -> None:
        pass


def _unauthenticated(message: str) -> ControlError:
    return ControlError(grpc.StatusCode.UNAUTHENTICATED, message)


#: A positive introspection result is trusted at most this long (s2cs --token-cache-ttl).
DEFAULT_CACHE_TTL = 60.0
#: A refused token is answered from the cache this long.
DEFAULT_NEGATIVE_TTL = 5.0
#: New-token introspections per second (token bucket) and the bucket's size.
DEFAULT_INTROSPECT_RATE = 10.0
DEFAULT_INTROSPECT_BURST = 20
#: Introspections in flight at once (each one holds a worker thread).
DEFAULT_INTROSPECT_CONCURRENCY = 4


class _TokenBucket:
    """``rate`` tokens a second, at most ``burst`` banked; ``take`` never waits."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self._level = self.burst
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level < 1.0:
            return False
        self._level -= 1.0
        return True


class GlobusAuthenticator(Authenticator):
    enabled = True
    CACHE_MAX = 10_000

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        timeout: float = 5.0,
        allowed_identities: Iterable[str] = (),
        allowed_domains: Iterable[str] = (),
        cache_ttl: float = DEFAULT_CACHE_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        introspect_rate: float = DEFAULT_INTROSPECT_RATE,
        introspect_burst: int = DEFAULT_INTROSPECT_BURST,
        introspect_concurrency: int = DEFAULT_INTROSPECT_CONCURRENCY,
    ) -> None:
        import globus_sdk
        from globus_sdk.transport import RequestsTransport, RetryConfig

        self.client_id = client_id
        self.scope = f"https://auth.globus.org/scopes/{client_id}/scistream"
        self.timeout = timeout
        self.allowed_identities = {i.strip().lower() for i in allowed_identities if i.strip()}
        self.allowed_domains = {d.strip().lower().lstrip("@") for d in allowed_domains if d.strip()}
        # One try, bounded: a caller waits at most ~timeout when Globus Auth is down.
        self._client = globus_sdk.ConfidentialAppAuthClient(
            client_id,
            client_secret,
            transport=RequestsTransport(http_timeout=timeout),
            retry_config=RetryConfig(max_retries=0),
        )
        self.cache_ttl = max(0.0, cache_ttl)
        self.negative_ttl = max(0.0, negative_ttl)
        self._cache: dict[str, tuple[Identity, float]] = {}  # key -> (identity, trusted until)
        self._refused: dict[str, tuple[str, float]] = {}  # key -> (message, cached until)
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._bucket = _TokenBucket(introspect_rate, introspect_burst)
        self._concurrency = max(1, introspect_concurrency)
        self._slots: asyncio.Semaphore | None = None  # made on the server's loop, at first use
        self.introspections = 0  # Globus calls made (tests, debugging)

    def close(self) -> None:
        self._cache.clear()
        self._refused.clear()

    async def authenticate(self, token: str | None) -> Identity:
        if not token or token == NO_TOKEN:
            raise _unauthenticated(
                "this gateway requires a Globus access token; log in with `s2uc login` and retry"
            )
        key = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        now = time.time()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[1] > now:
                return self._authorize(cached[0])
            del self._cache[key]
        refused = self._refused.get(key)
        if refused is not None:
            if refused[1] > now:
                raise _unauthenticated(refused[0])
            del self._refused[key]
        data = await self._introspect_once(key, token)
        now = time.time()
        try:
            identity, exp = self._validate(data, now)
        except ControlError as exc:
            self._remember_refusal(key, exc.message, now)
            raise
        self._remember(key, identity, min(exp, now + self.cache_ttl))
        return self._authorize(identity)

    async def _introspect_once(self, key: str, token: str) -> dict[str, Any]:
        # Concurrent calls with the same token share one introspection (and one
        # rate-limit token): only a token nobody is checking yet is charged.
        fut = self._inflight.get(key)
        if fut is None:
            if not self._bucket.take():
                log.warning("token introspection rate limit reached; refusing a new token for now")
                raise ControlError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the gateway is checking too many new tokens at the moment; try again shortly",
                )
            fut = asyncio.ensure_future(self._introspect_bounded(token))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    async def _introspect_bounded(self, token: str) -> dict[str, Any]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._concurrency)
        async with self._slots:
            return await self._introspect(token)

    async def _introspect(self, token: str) -> dict[str, Any]:
        import globus_sdk

        self.introspections += 1

        def call() -> dict[str, Any]:
            return dict(self._client.oauth2_token_introspect(token).data)

        try:
            return await asyncio.wait_for(asyncio.to_thread(call), self.timeout + 1.0)
        except globus_sdk.GlobusAPIError as exc:
            log.warning("Globus Auth refused the introspection request (HTTP %s)", exc.http_status)
            raise ControlError(
                grpc.StatusCode.UNAVAILABLE,
                "the gateway could not check the token with Globus Auth (its client credentials "
                "were refused); ask the operator to check --client-id and --client-secret",
            ) from None
        except (globus_sdk.NetworkError, TimeoutError, OSError) as exc:
            log.warning("Globus Auth unreachable: %s", type(exc).__name__)
            raise ControlError(
                grpc.StatusCode.UNAVAILABLE,
                "the gateway cannot reach Globus Auth to check the token; try again later",
            ) from None

    def _validate(self, data: dict[str, Any], now: float) -> tuple[Identity, float]:
        # Exactly the JSON true: a string "false", 1 or a missing field is not active.
        if data.get("active") is not True:
            raise _unauthenticated("the access token is not active (expired or revoked); log in again")
        exp = data.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or exp <= now:
            raise _unauthenticated("the access token has expired; log in again")
        scopes = str(data.get("scope") or "").split()
        if self.scope not in scopes:
            raise _unauthenticated(
                f"the access token does not carry this gateway's scope {self.scope}; "
                f"log in with `s2uc login --scope {self.client_id}`"
            )
        aud = data.get("aud") or []
        audiences = [aud] if isinstance(aud, str) else list(aud)
        if self.client_id not in audiences:
            raise _unauthenticated("the access token was not issued for this gateway")
        sub = data.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _unauthenticated("the access token names no identity")
        return Identity(sub, str(data.get("username") or "")), float(exp)

    def _authorize(self, identity: Identity) -> Identity:
        if not (self.allowed_identities or self.allowed_domains):
            return identity
        name = identity.username.lower()
        if identity.sub.lower() in self.allowed_identities or (name and name in self.allowed_identities):
            return identity
        if name and "@" in name and name.rsplit("@", 1)[1] in self.allowed_domains:
            return identity
        raise ControlError(
            grpc.StatusCode.PERMISSION_DENIED, f"identity {identity} is not allowed to use this gateway"
        )

    def _remember(self, key: str, identity: Identity, exp: float) -> None:
        if len(self._cache) >= self.CACHE_MAX:
            now = time.time()
            for k in [k for k, (_, e) in self._cache.items() if e <= now]:
                del self._cache[k]
            while len(self._cache) >= self.CACHE_MAX:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (identity, exp)

    def _remember_refusal(self, key: str, message: str, now: float) -> None:
        if self.negative_ttl <= 0:
            return
        if len(self._refused) >= self.CACHE_MAX:
            for k in [k for k, (_, until) in self._refused.items() if until <= now]:
                del self._refused[k]
            while len(self._refused) >= self.CACHE_MAX:
                del self._refused[next(iter(self._refused))]
        self._refused[key] = (message, now + self.negative_ttl)


def make_authenticator(
    client_id: str,
    client_secret: str,
    *,
    timeout: float = 5.0,
    allowed_identities: Iterable[str] = (),
    allowed_domains: Iterable[str] = (),
    cache_ttl: float = DEFAULT_CACHE_TTL,
) -> Authenticator:
    if not client_secret:
        return Authenticator()
    return GlobusAuthenticator(
        client_id,
        client_secret,
        timeout=timeout,
        allowed_identities=allowed_identities,
        allowed_domains=allowed_domains,
        cache_ttl=cache_ttl,
    )
