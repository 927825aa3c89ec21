"""The HAProxy backend: one foreground HAProxy (``-db``) per session, mode tcp with forced splice.

HAProxy cannot do TLS 1.3 with an external PSK, so security ``tls`` uses
certificates: by default the per-session ones the PROD s2cs mints
(scistream.certs.SessionCredentials; each side pins the other's, the files
live 0600 in the session directory and go with it), or the operator's when
configured (settings ``tls_cert``, ``tls_key``, ``tls_ca``, ``tls_server_name``;
see proxyconf.CertFiles), which take precedence on the PROD side. ``plain``
needs nothing; ``compat`` is refused when s2cs starts (1.x interop needs
stunnel or native). HAProxy 2.6 has no bandwidth limit, so a plan's
rate_limit is reported as not enforced. Counters come from the session's stats
socket (``show stat``).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import socket
from pathlib import Path
from typing import ClassVar, Literal

from scistream.certs import SESSION_SERVER_NAME, SessionCredentials, is_credentials
from scistream.s2cs.backends.base import BackendError, BackendOptions, SessionPlan, SessionUsage
from scistream.s2cs.backends.proxyconf import CertFiles, haproxy_config
from scistream.s2cs.backends.supervisor import TIMEOUT_SETTINGS, SubprocessBackend, write_private

_STATS_SOCKET = "stats.sock"
#: The operator certificate settings of the certificate-mode backends (HAProxy, nginx).
CERT_SETTINGS = ("tls_cert", "tls_key", "tls_ca", "tls_server_name")


def operator_certs(extra: dict[str, str] | object, proxy: str) -> CertFiles | None:
    """The certificate settings of a cert-mode backend, checked for readability; None if unset."""
    get = getattr(extra, "get", None)
    if get is None:
        return None
    files = CertFiles(
        cert=get("tls_cert", ""),
        key=get("tls_key", ""),
        ca=get("tls_ca", ""),
        server_name=get("tls_server_name", ""),
    )
    for label, path in (("tls_cert", files.cert), ("tls_key", files.key), ("tls_ca", files.ca)):
        if path and not Path(path).is_file():
            raise BackendError(f"{proxy} setting {label}: {path} is not a readable file")
    if not (files.cert or files.key or files.ca):
        return None
    if bool(files.cert) != bool(files.key):
        raise BackendError(f"{proxy} needs tls_cert and tls_key together")
    return files


def session_cert_files(plan: SessionPlan, path: Path, *, combined: bool) -> CertFiles | None:
    """Write the session's minted certificates (if its key holds them) into its private
    directory, mode 0600, and say where they are; None for a PSK or no key.

    PROD: the listener's certificate and key, and the client certificate it pins (as
    its CA). CONS: the client certificate and key, and the listener certificate it pins.
    ``combined``: also one PEM with certificate and key together (HAProxy's ``crt``).
    The files go when the session directory does (release, failure, restart sweep).
    """
    if plan.security != "tls" or not is_credentials(plan.psk_key):
        return None
    try:
        creds = SessionCredentials.decode(plan.psk_key)
    except ValueError as exc:
        raise BackendError(f"session {plan.uid}: {exc}") from None
    if plan.role == "PROD":
        if not creds.server_key:
            raise BackendError(f"session {plan.uid}: its certificates lack the listener's key")
        own_cert, own_key, pinned = creds.server_cert, creds.server_key, creds.client_cert
    else:
        own_cert, own_key, pinned = creds.client_cert, creds.client_key, creds.server_cert
    files = {"own.crt": own_cert, "own.key": own_key, "peer.crt": pinned}
    if combined:
        files["own.pem"] = own_cert + b"\n" + own_key
    for name, data in files.items():
        write_private(path / name, data.decode("ascii"))
    return CertFiles(
        cert=str(path / "own.crt"),
        key=str(path / "own.key"),
        ca=str(path / "peer.crt"),
        server_name=SESSION_SERVER_NAME if plan.role == "CONS" else "",
        combined_pem=str(path / "own.pem") if combined else "",
    )


class CertModeBackend:
    """What HAProxy and nginx share: no PSK, no compat; certificates minted per session
    unless the operator configured a certificate and key (PROD) or a CA (CONS)."""

    wan_keys: ClassVar[frozenset[str]] = frozenset({"certs"})
    security_modes: ClassVar[frozenset[str]] = frozenset({"tls", "plain"})
    options: BackendOptions

    def prod_credentials(self) -> Literal["psk", "mint", "operator"]:
        extra = self.options.extra
        return "operator" if extra.get("tls_cert") and extra.get("tls_key") else "mint"

    def cons_operator_certs(self) -> bool:
        return bool(self.options.extra.get("tls_ca"))


def parse_show_stat(text: str) -> SessionUsage:
    """Sum the frontends of HAProxy's ``show stat`` CSV into a SessionUsage.

    A frontend's ``bin`` is what clients sent (towards the target), ``bout``
    what they received.
    """
    lines = text.lstrip("# ").splitlines()
    to_target = from_target = active = total = 0
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("svname") != "FRONTEND":
            continue
        to_target += int(row.get("bin") or 0)
        from_target += int(row.get("bout") or 0)
        active += int(row.get("scur") or 0)
        total += int(row.get("stot") or 0)
    return SessionUsage(
        bytes_to_target=to_target,
        bytes_from_target=from_target,
        connections_active=active,
        connections_total=total,
    )


def _query_stats(session_dir: Path, timeout: float = 2.0) -> str:
    # A state dir path can exceed the 107 bytes of a unix socket address:
    # reach the socket through a descriptor of its directory.
    dirfd = os.open(session_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(f"/proc/self/fd/{dirfd}/{_STATS_SOCKET}")
            s.sendall(b"show stat\n")
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(dirfd)
    return b"".join(chunks).decode("utf-8", "replace")


class HaproxyBackend(CertModeBackend, SubprocessBackend):
    name = "haproxy"
    package = "haproxy"
    known_settings: ClassVar[tuple[str, ...]] = ("haproxy_bin", *TIMEOUT_SETTINGS, *CERT_SETTINGS)
    # SIGUSR1: soft stop -- close the listeners, let open streams finish.
    drain_signal: ClassVar[signal.Signals | None] = signal.SIGUSR1

    def _check_settings(self) -> None:
        super()._check_settings()
        operator_certs(self.options.extra, "HAProxy")

    def _write_files(self, plan: SessionPlan, path: Path) -> list[str]:
        certs = session_cert_files(plan, path, combined=True)
        if certs is None:
            certs = operator_certs(self.options.extra, "HAProxy")
        if certs is not None and plan.security == "tls" and certs.cert and not certs.combined_pem:
            # HAProxy wants the certificate and its key in one file: a private copy for the session.
            combined = path / "gateway.pem"
            pem = Path(certs.cert).read_text() + "\n" + Path(certs.key).read_text()
            write_private(combined, pem)
            certs = CertFiles(
                cert=certs.cert,
                key=certs.key,
                ca=certs.ca,
                server_name=certs.server_name,
                combined_pem=str(combined),
            )
        conf = path / "haproxy.cfg"
        write_private(
            conf,
            haproxy_config(
                plan,
                stats_socket=_STATS_SOCKET,
                certs=certs,
                idle_timeout_s=self._idle_timeout(),
                connect_timeout_s=self._connect_timeout(),
            ),
        )
        return [self.binary, "-db", "-f", str(conf)]

    async def _session_usage(self, uid: str) -> SessionUsage:
        errors = self._base_errors(uid)
        session = self._sessions.get(uid)
        if session is None or not session.child.alive:
            return SessionUsage(errors=errors)
        try:
            text = await asyncio.to_thread(_query_stats, session.path)
        except OSError:
            return SessionUsage(errors=errors)
        stats = parse_show_stat(text)
        return SessionUsage(
            bytes_to_target=stats.bytes_to_target,
            bytes_from_target=stats.bytes_from_target,
            connections_active=stats.connections_active,
            connections_total=stats.connections_total,
            errors=errors,
        )
