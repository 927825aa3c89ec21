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

Every value a config holds is rendered from a normalised value: endpoints
from :class:`scistream.endpoints.Endpoint` (``ipaddress`` objects or a
validated host name, an int port), never from the client's text; numbers as
ints; uids, identities, server names and paths only after a check that they
are one token of the proxy's syntax (no blank, quote, comment, ``;``, brace,
``$`` or control character; stunnel, which has no quoting, takes a path as the
rest of its line). A value that fails is refused with
:class:`BackendError` naming it, and every rendered config is checked to be
printable line by line before it is returned. A session endpoint can therefore
only ever become the one ``accept``/``connect``, ``bind``/``server`` or
``listen``/``proxy_pass`` value it was meant to be.

Idle streams are never cut by default: 1.x's HAProxy dropped a stream after
50 s of silence. Neither HAProxy nor nginx can disable their idle timers, so
the default is :data:`DEFAULT_IDLE_TIMEOUT_S` (a week), with TCP keepalive so
that a dead peer is still noticed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from scistream.clienttext import excerpt
from scistream.dataplane.api import COMPAT_TLS12_CIPHERS
from scistream.endpoints import Endpoint, InvalidEndpoint, parse, parse_host_name
from scistream.keys import compat_key_bytes, stunnel_key_text
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

_SAFE_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
_SAFE_IDENTITY = re.compile(r"[A-Za-z0-9._@-]{1,128}", re.ASCII)
#: One token in stunnel, HAProxy and nginx syntax alike: what paths and names may hold.
#: No blank (token separator), quote, '#'/';' (comments, nginx's directive end),
#: braces (nginx blocks), '$' (HAProxy and nginx variables), ',' (HAProxy address
#: lists), '\\' or control character. '%' is an IPv6 scope, '@' is in some home
#: directories (user@domain).
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9._/%:@+-]{1,4096}", re.ASCII)


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
    # fullmatch: re's '$' also matches before a trailing newline.
    if not isinstance(uid, str) or not _SAFE_UID.fullmatch(uid):
        raise BackendError(f"session id {excerpt(uid)} has characters a proxy backend cannot use")
    return uid


def endpoint(text: str) -> Endpoint:
    """A route's listen or target text parsed again with the strict grammar: what is
    rendered is this value, whatever produced the text."""
    try:
        return parse(text)
    except InvalidEndpoint as exc:
        raise BackendError(str(exc)) from None


def split_endpoint(text: str) -> tuple[str, int]:
    ep = endpoint(text)
    return ep.host_text, ep.port


def token(value: str, what: str) -> str:
    """``value`` if it is one safe token of config syntax, else BackendError naming ``what``."""
    if not isinstance(value, str) or not _SAFE_TOKEN.fullmatch(value):
        raise BackendError(
            f"{what} {excerpt(value)} cannot be written into a proxy configuration: use only "
            "letters, digits and . _ / % : @ + -"
        )
    return value


def line_value(value: str, what: str) -> str:
    """``value`` if stunnel reads it back whole as the value of ``key = value`` (it takes the
    rest of the line, trimmed): printable, one line, no blank at either end."""
    if not isinstance(value, str) or not value or not value.isprintable() or value != value.strip():
        raise BackendError(f"{what} {excerpt(value)} cannot be written into a stunnel configuration")
    return value


def _server_name(value: str) -> str:
    try:
        return parse_host_name(value)
    except InvalidEndpoint:
        raise BackendError(f"tls_server_name {excerpt(value)} is not a host name") from None


def _number(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BackendError(f"{what} must be an integer, not {excerpt(value)}")
    return value


def _printable(text: str) -> str:
    """The last check of every renderer: no line holds a control character."""
    for line in text.split("\n"):
        if not line.isprintable():
            raise BackendError(
                f"refusing a proxy configuration line with a control character: {excerpt(line)}"
            )
    return text


def _host(ep: Endpoint) -> str:
    if isinstance(ep.host, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return token(str(ep.host), "address")
    try:
        return token(parse_host_name(ep.host), "host name")
    except InvalidEndpoint as exc:
        raise BackendError(str(exc)) from None


def _host_port(ep: Endpoint) -> str:
    """``host:port`` as stunnel reads it (it splits at the last ':', IPv6 unbracketed)."""
    return f"{_host(ep)}:{_number(ep.port, 'port')}"


def _bracketed(ep: Endpoint) -> str:
    """``host:port`` with IPv6 bracketed (nginx)."""
    host = _host(ep)
    if isinstance(ep.host, ipaddress.IPv6Address):
        host = f"[{host}]"
    return f"{host}:{_number(ep.port, 'port')}"


def _haproxy_address(ep: Endpoint) -> str:
    """HAProxy's address form: ``ipv6@`` in front of an IPv6 address."""
    prefix = "ipv6@" if isinstance(ep.host, ipaddress.IPv6Address) else ""
    return f"{prefix}{_host_port(ep)}"


def render_psk_key(key: bytes, *, compat: bool = False) -> str:
    """The key text of stunnel's ``identity:key`` line for the key bytes ``key``.

    The text makes stunnel use exactly ``key``, the bytes the native engine and the
    peer gateway use (scistream.keys). 1.x interop (``compat``): a compat key given
    as a 1.x gateway's key text (the uid without dashes) means the bytes stunnel
    decodes from it, as it does for a 1.x gateway.
    """
    text = stunnel_key_text(compat_key_bytes(key) if compat else key)
    if len(text) // 2 < STUNNEL_MIN_PSK_BYTES:
        raise BackendError(f"stunnel needs a pre-shared key of at least {STUNNEL_MIN_PSK_BYTES} bytes")
    return text


def stunnel_psk_file(plan: SessionPlan) -> str:
    """``identity:key`` for stunnel's PSKsecrets (mode 0600 on disk; never logged)."""
    if not isinstance(plan.psk_identity, str) or not _SAFE_IDENTITY.fullmatch(plan.psk_identity):
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
    psk_file = line_value(psk_file, "the PSK file path")
    if client and not _SAFE_IDENTITY.fullmatch(plan.psk_identity or ""):
        raise BackendError("the session's PSK identity is empty or has characters stunnel cannot use")
    lines = [
        "; generated by s2cs for session " + plan.uid,
        "foreground = yes",
        "syslog = no",
        "pid =",
        "debug = 5",
        "",
    ]
    for i, route in enumerate(plan.routes):
        lines += [
            f"[r{i}]",
            f"accept = {_host_port(endpoint(route.listen))}",
            f"connect = {_host_port(endpoint(route.target))}",
            f"client = {'yes' if client else 'no'}",
            "delay = no",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
            "socket = l:SO_KEEPALIVE=1",
            "socket = r:SO_KEEPALIVE=1",
            f"TIMEOUTidle = {_number(idle_timeout_s, 'idle_timeout')}",
            f"TIMEOUTconnect = {_number(connect_timeout_s, 'connect_timeout')}",
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
    return _printable("\n".join(lines))


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
    if certs is None:
        return None
    # Operator settings, but still written into the config: one token each, or refused.
    return CertFiles(
        cert=token(certs.cert, "tls_cert") if certs.cert else "",
        key=token(certs.key, "tls_key") if certs.key else "",
        ca=token(certs.ca, "tls_ca") if certs.ca else "",
        server_name=_server_name(certs.server_name) if certs.server_name else "",
        combined_pem=token(certs.combined_pem, "the combined PEM path") if certs.combined_pem else "",
    )


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
    stats_socket = token(stats_socket, "the stats socket path")
    lines = [
        "# generated by s2cs for session " + plan.uid,
        "global",
        "    log stderr format raw local0 notice",
        f"    stats socket unix@{stats_socket} mode 600 level operator",
        f"    tune.pipesize {_number(pipesize, 'pipesize')}",
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
        f"    timeout connect {_number(connect_timeout_s, 'connect_timeout')}s",
        f"    timeout client {_number(idle_timeout_s, 'idle_timeout')}s",
        f"    timeout server {idle_timeout_s}s",
        "",
    ]
    for i, route in enumerate(plan.routes):
        bind = f"    bind {_haproxy_address(endpoint(route.listen))}"
        server = f"    server t{i} {_haproxy_address(endpoint(route.target))}"
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
    return _printable("\n".join(lines))


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
        lines.append(f"load_module {token(stream_module, 'nginx_stream_module')};")
    lines += [
        "daemon off;",
        "master_process on;",
        f"worker_processes {_number(workers, 'nginx_workers')};",
        f"pid {token(pid_file, 'the pid file path')};",
        "error_log stderr notice;",
        "events { worker_connections 4096; }",
        "stream {",
        f"    proxy_buffer_size {NGINX_BUFFER_SIZE};",
        f"    proxy_timeout {_number(idle_timeout_s, 'idle_timeout')}s;",
        f"    proxy_connect_timeout {_number(connect_timeout_s, 'connect_timeout')}s;",
        "    tcp_nodelay on;",
        "    proxy_half_close on;",
    ]
    if plan.rate_limit > 0 and plan.routes:
        per_conn = max(1, _number(plan.rate_limit, "rate_limit") // len(plan.routes))
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
        ssl = " ssl" if tls is not None and plan.role == "PROD" else ""
        lines += [
            "    server {",
            f"        listen {_bracketed(endpoint(route.listen))}{ssl} so_keepalive=on;",
            f"        proxy_pass {_bracketed(endpoint(route.target))};",
            "        proxy_socket_keepalive on;",
            "    }",
        ]
    lines += ["}", ""]
    return _printable("\n".join(lines))
