"""Configuration text for the external proxies (stunnel, HAProxy, nginx): pure functions, no I/O.

Every renderer takes a :class:`SessionPlan` plus the paths the backend chose
under the session directory and returns the file's text, so the security rules
below can be unit-tested without starting a proxy:

* ``tls``: the WAN leg (PROD listeners, CONS targets) is TLS 1.3 only. stunnel
  uses the session's external PSK with SHA-256 suites (stunnel 5.68 fails TLS
  1.3 PSK with SHA-384 suites); HAProxy and nginx cannot do TLS 1.3 external
  PSK, so they use operator-provided certificates (:class:`CertFiles`).
* ``compat`` (SciStream 1.x interop, stunnel only): TLS 1.2, identity
  ``client1``, PSK suites only. 1.x configured ``ciphers = eNULL``, which lets
  stunnel negotiate the anonymous AECDH-NULL-SHA; here no anonymous suite is
  ever offered or accepted (PSK-NULL-SHA256 is the worst we agree on).
* ``plain``: no TLS anywhere.

Idle streams are never cut by default: 1.x's HAProxy dropped a stream after
50 s of silence. Neither HAProxy nor nginx can disable their idle timers, so
the default is :data:`DEFAULT_IDLE_TIMEOUT_S` (a week), with TCP keepalive so
that a dead peer is still noticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scistream.dataplane.api import COMPAT_TLS12_CIPHERS
from scistream.endpoints import InvalidEndpoint, format_endpoint, parse_endpoint
from scistream.s2cs.backends.base import BackendError, SessionPlan

#: Seconds of silence after which a proxy may close a stream (effectively never).
DEFAULT_IDLE_TIMEOUT_S = 7 * 24 * 3600
#: Seconds to establish the connection to a target.
DEFAULT_CONNECT_TIMEOUT_S = 10
#: stunnel accepts TLS 1.3 external PSKs only with SHA-256 suites.
STUNNEL_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
#: stunnel refuses PSKs shorter than this many bytes.
STUNNEL_MIN_PSK_BYTES = 16
#: HAProxy's best configuration here (BENCHMARKING.md): forced splice, 1 MiB pipes.
HAPROXY_PIPESIZE = 1 << 20
#: nginx stream buffer per direction (BENCHMARKING.md: 1 MiB).
NGINX_BUFFER_SIZE = "1m"

_SAFE_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SAFE_IDENTITY = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")


@dataclass(frozen=True)
class CertFiles:
    """Operator-provided certificate material for certificate-mode TLS (HAProxy, nginx).

    ``cert``/``key``: this gateway's certificate chain and key (PEM). ``ca``:
    the CA that signs the peer gateways. A PROD listener needs cert+key and,
    when ca is set, also requires a client certificate signed by it (mutual
    TLS). A CONS connection needs ca (it verifies the PROD gateway) and
    presents cert+key when set. ``server_name``: the name the CONS side checks
    in the PROD certificate (and sends as SNI); empty = HAProxy checks only
    the chain, nginx checks the target's host.
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""
    combined_pem: str = ""  # HAProxy: cert + key in one file, written by the backend


def check_uid(uid: str) -> str:
    """A uid usable as a directory name and in config files (no path tricks, no quoting)."""
    if not _SAFE_UID.match(uid or ""):
        raise BackendError(f"session id {uid!r} has characters a proxy backend cannot use")
    return uid


def split_endpoint(text: str) -> tuple[str, int]:
    try:
        return parse_endpoint(text)
    except InvalidEndpoint as exc:
        raise BackendError(str(exc)) from None


def _is_hex_text(key: bytes) -> bool:
    return len(key) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in key)


def render_psk_key(key: bytes, *, compat: bool = False) -> str:
    """The key text of stunnel's ``identity:key`` line for the key bytes ``key``.

    stunnel 5.68 decodes a key text made only of hex digits as hex (it uses
    any other text as raw bytes). So the text is ``key.hex()``: stunnel then
    uses exactly ``key``, the bytes the native engine and the peer gateway use.

    1.x interop (``compat``): a 1.x gateway writes ``client1:<uid without
    dashes>`` and stunnel decodes those 32 hex digits to 16 key bytes. A compat
    key given in that hex-text form is written verbatim, so it means what it
    means to a 1.x stunnel; raw key bytes are hex-encoded as above.
    """
    verbatim = compat and bool(key) and _is_hex_text(key)
    text = key.decode("ascii") if verbatim else key.hex()
    if len(text) // 2 < STUNNEL_MIN_PSK_BYTES:
        raise BackendError(f"stunnel needs a pre-shared key of at least {STUNNEL_MIN_PSK_BYTES} bytes")
    return text


def stunnel_psk_file(plan: SessionPlan) -> str:
    """``identity:key`` for stunnel's PSKsecrets (mode 0600 on disk; never logged)."""
    if not _SAFE_IDENTITY.match(plan.psk_identity or ""):
        raise BackendError("the session's PSK identity is empty or has characters stunnel cannot use")
    return f"{plan.psk_identity}:{render_psk_key(plan.psk_key, compat=plan.security == 'compat')}\n"


def stunnel_config(
    plan: SessionPlan,
    *,
    psk_file: str,
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
) -> str:
    """stunnel config: one service per route, foreground, log to stderr, no pid file."""
    if plan.security == "plain":
        raise BackendError("stunnel does not carry plain sessions; use the native, haproxy or nginx backend")
    if plan.security not in ("tls", "compat"):
        raise BackendError(f"unknown security mode {plan.security!r}")
    check_uid(plan.uid)
    client = plan.role == "CONS"
    lines = [
        "; generated by s2cs for session " + plan.uid,
        "foreground = yes",
        "syslog = no",
        "pid =",
        "debug = 5",
        "",
    ]
    for i, route in enumerate(plan.routes):
        lhost, lport = split_endpoint(route.listen)
        thost, tport = split_endpoint(route.target)
        lines += [
            f"[r{i}]",
            f"accept = {lhost}:{lport}",
            f"connect = {thost}:{tport}",
            f"client = {'yes' if client else 'no'}",
            "delay = no",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
            "socket = l:SO_KEEPALIVE=1",
            "socket = r:SO_KEEPALIVE=1",
            f"TIMEOUTidle = {idle_timeout_s}",
            f"TIMEOUTconnect = {connect_timeout_s}",
            f"PSKsecrets = {psk_file}",
        ]
        if client:
            lines.append(f"PSKidentity = {plan.psk_identity}")
        if plan.security == "tls":
            lines += [
                "sslVersionMin = TLSv1.3",
                f"ciphersuites = {STUNNEL_TLS13_SUITES}",
            ]
        else:
            # PSK suites only; security level 0 so that PSK-NULL-SHA256 (what a
            # 1.x "ciphers = eNULL" peer can agree on) is allowed. No aNULL suite
            # is in the list, so no anonymous handshake is possible.
            lines += [
                "sslVersionMin = TLSv1.2",
                "sslVersionMax = TLSv1.2",
                f"ciphers = {COMPAT_TLS12_CIPHERS}",
                "securityLevel = 0",
            ]
        lines.append("")
    return "\n".join(lines)


def _need_cert_mode(plan: SessionPlan, certs: CertFiles | None, proxy: str) -> CertFiles | None:
    """The certificate files a tls plan needs on this side, or None for plain."""
    if plan.security == "compat":
        raise BackendError("1.x interop mode needs the stunnel or native backend")
    if plan.security == "plain":
        return None
    if plan.security != "tls":
        raise BackendError(f"unknown security mode {plan.security!r}")
    if plan.role == "PROD" and (certs is None or not certs.cert or not certs.key):
        raise BackendError(
            f"{proxy} cannot do TLS with a pre-shared key; configure tls_cert and tls_key "
            "(and tls_ca) for this backend (s2cs --backend-option tls_cert=PATH ...), "
            "or use security plain"
        )
    if plan.role == "CONS" and (certs is None or not certs.ca):
        raise BackendError(
            f"{proxy} cannot do TLS with a pre-shared key; configure tls_ca (the CA of the "
            "producer gateway's certificate) for this backend (s2cs --backend-option "
            "tls_ca=PATH), or use security plain"
        )
    return certs


def haproxy_config(
    plan: SessionPlan,
    *,
    stats_socket: str,
    certs: CertFiles | None = None,
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
    pipesize: int = HAPROXY_PIPESIZE,
) -> str:
    """HAProxy config: mode tcp, forced splice, one frontend/backend pair per route."""
    check_uid(plan.uid)
    tls = _need_cert_mode(plan, certs, "HAProxy")
    lines = [
        "# generated by s2cs for session " + plan.uid,
        "global",
        "    log stderr format raw local0 notice",
        f"    stats socket unix@{stats_socket} mode 600 level operator",
        f"    tune.pipesize {pipesize}",
        "    ssl-server-verify required",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option dontlognull",
        "    option splice-request",
        "    option splice-response",
        "    option clitcpka",
        "    option srvtcpka",
        f"    timeout connect {connect_timeout_s}s",
        f"    timeout client {idle_timeout_s}s",
        f"    timeout server {idle_timeout_s}s",
        "",
    ]
    for i, route in enumerate(plan.routes):
        lhost, lport = split_endpoint(route.listen)
        thost, tport = split_endpoint(route.target)
        bind = f"    bind {'ipv6@' if ':' in lhost else ''}{lhost}:{lport}"
        server = f"    server t{i} {'ipv6@' if ':' in thost else ''}{thost}:{tport}"
        if tls is not None and plan.role == "PROD":
            bind += f" ssl crt {tls.combined_pem} ssl-min-ver TLSv1.3"
            if tls.ca:
                bind += f" ca-file {tls.ca} verify required"
        if tls is not None and plan.role == "CONS":
            server += f" ssl ssl-min-ver TLSv1.3 verify required ca-file {tls.ca}"
            if tls.combined_pem:
                server += f" crt {tls.combined_pem}"
            if tls.server_name:
                server += f" sni str({tls.server_name}) verifyhost {tls.server_name}"
        lines += [f"frontend r{i}", bind, f"    default_backend t{i}", "", f"backend t{i}", server, ""]
    return "\n".join(lines)


def nginx_config(
    plan: SessionPlan,
    *,
    pid_file: str,
    stream_module: str,
    certs: CertFiles | None = None,
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
    workers: int = 1,
) -> str:
    """nginx config: stream module, foreground master, everything under the session prefix.

    ``rate_limit`` (bytes/s for the session) becomes ``proxy_upload_rate`` and
    ``proxy_download_rate`` of rate/len(routes) per connection: nginx limits
    each connection, so the session total holds when each listener carries
    one connection (the SciStream usage).
    """
    check_uid(plan.uid)
    tls = _need_cert_mode(plan, certs, "nginx")
    lines = [
        "# generated by s2cs for session " + plan.uid,
    ]
    if stream_module:
        lines.append(f"load_module {stream_module};")
    lines += [
        "daemon off;",
        "master_process on;",
        f"worker_processes {workers};",
        f"pid {pid_file};",
        "error_log stderr notice;",
        "events { worker_connections 4096; }",
        "stream {",
        f"    proxy_buffer_size {NGINX_BUFFER_SIZE};",
        f"    proxy_timeout {idle_timeout_s}s;",
        f"    proxy_connect_timeout {connect_timeout_s}s;",
        "    tcp_nodelay on;",
        "    proxy_half_close on;",
    ]
    if plan.rate_limit > 0 and plan.routes:
        per_conn = max(1, plan.rate_limit // len(plan.routes))
        lines += [f"    proxy_upload_rate {per_conn};", f"    proxy_download_rate {per_conn};"]
    if tls is not None and plan.role == "PROD":
        lines += [
            f"    ssl_certificate {tls.cert};",
            f"    ssl_certificate_key {tls.key};",
            "    ssl_protocols TLSv1.3;",
        ]
        if tls.ca:
            lines += [f"    ssl_client_certificate {tls.ca};", "    ssl_verify_client on;"]
    if tls is not None and plan.role == "CONS":
        lines += [
            "    proxy_ssl on;",
            "    proxy_ssl_protocols TLSv1.3;",
            f"    proxy_ssl_trusted_certificate {tls.ca};",
            "    proxy_ssl_verify on;",
        ]
        if tls.server_name:
            lines += [f"    proxy_ssl_name {tls.server_name};", "    proxy_ssl_server_name on;"]
        if tls.cert and tls.key:
            lines += [f"    proxy_ssl_certificate {tls.cert};", f"    proxy_ssl_certificate_key {tls.key};"]
    for route in plan.routes:
        lhost, lport = split_endpoint(route.listen)
        thost, tport = split_endpoint(route.target)
        listen = format_endpoint(lhost, lport)
        ssl = " ssl" if tls is not None and plan.role == "PROD" else ""
        lines += [
            "    server {",
            f"        listen {listen}{ssl} so_keepalive=on;",
            f"        proxy_pass {format_endpoint(thost, tport)};",
            "        proxy_socket_keepalive on;",
            "    }",
        ]
    lines += ["}", ""]
    return "\n".join(lines)
