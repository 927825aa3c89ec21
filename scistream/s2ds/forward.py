"""`s2ds forward`: one route in this process, no daemon, no control socket.

It replaces the hand-written stunnel that a SciStream 1.x user starts on an HPC
compute node: same PSKsecrets file, same 1.x key-from-uid convention.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from scistream.dataplane import (
    COMPAT_PSK_IDENTITY,
    EngineBase,
    EngineStats,
    Route,
    Tls,
    TlsMode,
    TlsRole,
)
from scistream.keys import compat_key, key_from_stunnel_text
from scistream.s2ds.units import format_bytes

log = logging.getLogger(__name__)

#: stunnel refuses shorter keys; so do we, for the same reason.
MIN_PSK_BYTES = 16


class ForwardError(Exception):
    """Bad forwarder input; the message is one human sentence."""


def read_psk_file(path: str | os.PathLike[str], identity: str = "") -> tuple[str, bytes]:
    """(identity, key) from a stunnel PSKsecrets file of ``IDENTITY:KEY`` lines.

    As in stunnel, the key is the text after the first colon, decoded as hex
    when it is hex digits and used as bytes otherwise (see scistream/keys.py). The first
    entry is used unless ``identity`` names another.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ForwardError(f"cannot read PSK file {p}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("PSK file %s is readable by others; chmod 600 it", p)
    entries: list[tuple[str, bytes]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ident, sep, key_text = line.partition(":")
        if not sep or not ident or not key_text:
            raise ForwardError(f"line {n} of PSK file {p} is not IDENTITY:KEY")
        key = key_from_stunnel_text(key_text)
        if len(key) < MIN_PSK_BYTES:
            raise ForwardError(f"the key of {ident!r} in {p} is shorter than {MIN_PSK_BYTES} bytes")
        entries.append((ident, key))
    if not entries:
        raise ForwardError(f"PSK file {p} holds no IDENTITY:KEY line")
    if not identity:
        return entries[0]
    for ident, key in entries:
        if ident == identity:
            return ident, key
    raise ForwardError(f"PSK file {p} has no identity {identity!r}")


def build_tls(
    role: str | None,
    mode: str | None,
    *,
    psk_file: str | None = None,
    psk_from_uid: str | None = None,
    psk_identity: str = "",
    cert: str = "",
    key: str = "",
    ca: str = "",
    server_name: str = "",
    ciphers: str = "",
) -> Tls | None:
    """The Tls of the forwarder's route from its command-line options (None: plain)."""
    has_psk = bool(psk_file or psk_from_uid)
    has_cert = bool(cert or key or ca)
    if role is None:
        if has_psk or has_cert or mode:
            raise ForwardError(
                "--psk-file, --psk-from-uid, --cert/--key/--ca and --tls-mode need --tls server|client"
            )
        return None
    if psk_file and psk_from_uid:
        raise ForwardError("give either --psk-file or --psk-from-uid, not both")
    if mode is None:
        mode = "compat" if psk_from_uid else "cert" if has_cert and not has_psk else "psk"
    tls_mode = TlsMode(mode)
    identity, secret = "", b""
    if tls_mode in (TlsMode.PSK, TlsMode.COMPAT):
        if psk_file:
            identity, secret = read_psk_file(psk_file, psk_identity)
        elif psk_from_uid:
            identity = psk_identity or COMPAT_PSK_IDENTITY
            secret = compat_key(psk_from_uid)
        else:
            raise ForwardError(f"--tls-mode {mode} needs --psk-file or --psk-from-uid")
    elif has_psk:
        raise ForwardError("--tls-mode cert takes --cert/--key/--ca, not a PSK")
    return Tls(
        role=TlsRole(role),
        mode=tls_mode,
        psk_identity=identity,
        psk_key=secret,
        cert_file=cert,
        key_file=key,
        ca_file=ca,
        server_name=server_name,
        ciphers=ciphers,
    )


@dataclass
class _Sample:
    at: float
    to_target: int
    from_target: int


def format_stats_line(
    stats: EngineStats, route_id: str, elapsed: float, prev: _Sample | None
) -> tuple[str, _Sample]:
    rs = stats.routes[route_id]
    now = _Sample(time.monotonic(), rs.bytes_to_target, rs.bytes_from_target)
    rates = ""
    if prev is not None and now.at > prev.at:
        dt = now.at - prev.at
        rates = (
            f" ({format_bytes((now.to_target - prev.to_target) / dt)}/s"
            f" | {format_bytes((now.from_target - prev.from_target) / dt)}/s)"
        )
    errors = " ".join(f"{k}={v}" for k, v in sorted(rs.errors.items()) if v)
    line = (
        f"{elapsed:7.1f}s  conns {rs.connections_active} active / {rs.connections_total} total  "
        f"to_target {format_bytes(rs.bytes_to_target)}  from_target {format_bytes(rs.bytes_from_target)}"
        f"{rates}{'  errors ' + errors if errors else ''}"
    )
    return line, now


class Forwarder:
    """Runs one route until a signal; ``run()`` returns the exit code.

    First SIGTERM/SIGINT: stop accepting, let streams finish, exit 0 (1 if
    ``drain_timeout`` cut some). A second one: close now, gone within 1.5 s.
    """

    def __init__(
        self,
        engine: EngineBase,
        route: Route,
        *,
        echo: Callable[[str], None],
        stats_interval: float = 0.0,
        drain_timeout: float = 0.0,
    ) -> None:
        self.engine = engine
        self.route = route
        self.echo = echo
        self.stats_interval = stats_interval
        self.drain_timeout = drain_timeout
        self._signals: list[int] = []
        self._wake = threading.Event()
        self._drained = threading.Event()
        self._drain_complete = False
        self._draining = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)
        self._wake.set()
        if len(self._signals) >= 2:
            # Exit even if the main thread is stuck inside an engine call.
            timer = threading.Timer(1.5, os._exit, args=(128 + signum,))
            timer.daemon = True
            timer.start()

    def _drain(self) -> None:
        try:
            self._drain_complete = self.engine.drain(self.drain_timeout or None)
        except Exception as exc:
            log.error("drain failed: %s", exc)
        self._drained.set()
        self._wake.set()

    def run(self) -> int:
        # Handlers first: whoever saw "listening on" may signal at once, and a signal
        # must then drain, not kill the process with the default action.
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            info = self.engine.add_route(self.route)
            tls = self.route.tls
            self.echo(
                f"listening on {info.bound} -> {','.join(self.route.targets)}"
                f" ({f'tls {tls.role.value}/{tls.mode.value}' if tls else 'plain'}"
                f"{f', {self.route.rate_limit} B/s' if self.route.rate_limit else ''})"
            )
            return self._loop()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _loop(self) -> int:
        started = time.monotonic()
        prev: _Sample | None = None
        next_stats = started + self.stats_interval
        while True:
            timeout = max(0.0, next_stats - time.monotonic()) if self.stats_interval else None
            self._wake.wait(timeout)
            self._wake.clear()
            if len(self._signals) >= 2:
                log.warning("second signal: closing every connection now")
                self.engine.close()
                return 128 + self._signals[-1]
            if len(self._signals) == 1 and not self._draining:
                self._draining = True
                log.info(
                    "draining: no new connections, streams in flight finish; signal again to exit now"
                )
                threading.Thread(target=self._drain, daemon=True, name="s2ds-drain").start()
            if self._drained.is_set():
                if not self._drain_complete:
                    log.warning("drain timeout passed; closing the remaining connections")
                self.engine.close()
                return 0 if self._drain_complete else 1
            if self.stats_interval and time.monotonic() >= next_stats:
                line, prev = format_stats_line(
                    self.engine.stats(self.route.route_id),
                    self.route.route_id,
                    time.monotonic() - started,
                    prev,
                )
                self.echo(line)
                next_stats += self.stats_interval
