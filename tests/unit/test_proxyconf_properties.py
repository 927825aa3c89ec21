"""Property tests of the proxy config renderers (issue 14 item 1): arbitrary endpoint text goes
through parse_endpoint (the validation a hello or update gets) and then through each renderer;
the config is parsed back, in the proxy's own syntax, into exactly the intended directives.

The parsers below are deliberately plain: each asserts first that the text holds none of the
characters (quotes, '$', '\\', control characters) that would make the proxy read it
differently from them, so "parsed back into exactly these directives" is what the proxy sees.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scistream.endpoints import Endpoint, InvalidEndpoint, normalise, parse, parse_endpoint
from scistream.s2cs.backends.base import BackendError, RoutePlan, SessionPlan
from scistream.s2cs.backends.proxyconf import CertFiles, haproxy_config, nginx_config, stunnel_config

UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
LISTENERS = ("127.0.0.1:5100", "[::1]:5101")
KEY = bytes(range(32))
CERTS = CertFiles("/etc/gw/cert.pem", "/etc/gw/key.pem", "/etc/gw/ca.pem", "gw.example.org", "/s/gw.pem")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- endpoint text: arbitrary, near-valid, and the issue's payloads -------------------------

_NASTY = "[]:.%-_ \t\n\r;=$\"'{}#\\/()@,²٨\x00\x0b\x0c\x85\u2028é"
_ALPHABET = string.ascii_letters + string.digits + _NASTY
_PORTS = st.one_of(st.integers(0, 70000).map(str), st.text(alphabet=string.digits + "²٨ \n", max_size=6))
_SCOPES = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.-]{1,15}", fullmatch=True),
    st.text(alphabet=_ALPHABET, max_size=40),
)
INJECTIONS = [
    "[::ffff:192.0.2.2%lo:1\nconnect = 127.0.0.1:28081\n;]:28082",
    "[::ffff:127.0.0.1%lo:1\n    server evil 127.0.0.1:28081\nglobal\n    stats socket ipv4@127.0.0.1:28083 "
    'level admin\nfrontend leak\n    bind 127.0.0.1:28084\n    mode http\n    http-request return string "'
    '${SCISTREAM_CLIENT_SECRET}"\n#]:28082',
    "[fe80::1%x;}server{listen 28085;proxy_pass 127.0.0.1:28081;}#]:28082",
    "evil.example:1\nconnect = 127.0.0.1:28081",
]
ENDPOINT_TEXT = st.one_of(
    st.sampled_from(INJECTIONS),
    st.text(max_size=80),
    st.text(alphabet=_ALPHABET, max_size=60),
    st.builds(lambda a, p: f"{a}:{p}", st.ip_addresses(v=4).map(str), _PORTS),
    st.builds(lambda a, p: f"[{a}]:{p}", st.ip_addresses(v=6).map(str), _PORTS),
    st.builds(lambda a, s, p: f"[{a}%{s}]:{p}", st.ip_addresses(v=6).map(str), _SCOPES, _PORTS),
    st.builds(
        lambda h, p: f"{h}:{p}",
        st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.\-]{0,40}[A-Za-z])?", fullmatch=True),
        _PORTS,
    ),
)


# -- what each renderer must say ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    role: str
    security: str
    certs: CertFiles | None


STUNNEL_CASES = [Case("PROD", "tls", None), Case("CONS", "tls", None), Case("CONS", "compat", None)]
CERT_CASES = [
    Case("PROD", "plain", None),
    Case("CONS", "plain", None),
    Case("PROD", "tls", CERTS),
    Case("CONS", "tls", CERTS),
]


def make_plan(case: Case, targets: list[str], identity: str = UID) -> SessionPlan:
    routes = tuple(RoutePlan(f"{UID}/{i}", LISTENERS[i % 2], t) for i, t in enumerate(targets))
    ident = "client1" if case.security == "compat" else identity
    key = b"" if case.security == "plain" else KEY
    return SessionPlan(UID, case.role, routes, case.security, ident, key)  # type: ignore[arg-type]


def host_port(text: str) -> Endpoint:
    """``host:port`` as stunnel and HAProxy read it: split at the last ':'; IPv6 unbracketed."""
    host, _, port = text.rpartition(":")
    assert re.fullmatch(r"[0-9]{1,5}", port), text
    try:
        return Endpoint(ipaddress.ip_address(host), int(port))
    except ValueError:
        assert re.fullmatch(r"[a-z0-9.-]+", host), text
        return Endpoint(host, int(port))


def bracketed(text: str) -> Endpoint:
    """nginx's ``host:port`` / ``[v6]:port``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        assert re.fullmatch(r"[0-9]{1,5}", port), text
        return Endpoint(ipaddress.IPv6Address(host), int(port))
    return host_port(text)


def _plain_text(text: str) -> None:
    """No character any of the three proxies would read specially inside a value."""
    assert "\r" not in text and "\x00" not in text
    for line in text.split("\n"):
        assert line.isprintable(), repr(line)
        assert not set(line) & set("\"'\\$`"), repr(line)


def parse_stunnel(text: str) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """stunnel's reading: ';'/'#' comment lines, '[name]' sections, 'key = value' lines (the
    value is the rest of the line: stunnel has no quoting and no variables)."""
    assert "\r" not in text and all(line.isprintable() for line in text.split("\n"))
    globals_: list[tuple[str, str]] = []
    sections: dict[str, list[tuple[str, str]]] = {}
    current = globals_
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            assert line.endswith("]"), raw
            name = line[1:-1].strip()
            assert name not in sections, f"section {name} twice"
            current = sections.setdefault(name, [])
            continue
        key, eq, value = line.partition("=")
        assert eq, f"not a directive: {raw!r}"
        current.append((key.strip(), value.strip()))
    return globals_, sections


def parse_haproxy(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """HAProxy's reading: a section keyword at column 0, indented whitespace-separated words."""
    _plain_text(text)
    sections: list[tuple[list[str], list[list[str]]]] = []
    for raw in text.split("\n"):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        words = raw.split()
        assert not any("#" in w for w in words), raw  # HAProxy starts a comment at '#'
        if raw[0].isspace():
            assert sections, raw
            sections[-1][1].append(words)
        else:
            sections.append((words, []))
    return sections


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None


def parse_nginx(text: str) -> list[Directive]:
    """nginx's reading: words, ';' ends a directive, '{ ... }' a block, '#' a comment to the
    end of the line."""
    _plain_text(text)
    tokens: list[str] = []
    for line in text.split("\n"):
        tokens += re.findall(r"[{};]|[^\s{};]+", line.split("#", 1)[0])
    pos = 0

    def block(top: bool) -> list[Directive]:
        nonlocal pos
        out: list[Directive] = []
        while pos < len(tokens):
            if tokens[pos] == "}":
                assert not top, "unbalanced }"
                pos += 1
                return out
            words: list[str] = []
            while tokens[pos] not in ("{", ";", "}"):
                words.append(tokens[pos])
                pos += 1
            assert words, f"empty directive at token {pos}"
            if tokens[pos] == ";":
                pos += 1
                out.append(Directive(words[0], words[1:], None))
            elif tokens[pos] == "{":
                pos += 1
                out.append(Directive(words[0], words[1:], block(False)))
            else:
                raise AssertionError("directive ended by }")
        assert top, "unclosed {"
        return out

    return block(True)


# -- the checks --------------------------------------------------------------------------------


def check_stunnel(text: str, case: Case, targets: list[Endpoint]) -> None:
    globals_, sections = parse_stunnel(text)
    assert globals_ == [("foreground", "yes"), ("syslog", "no"), ("pid", ""), ("debug", "5")]
    assert list(sections) == [f"r{i}" for i in range(len(targets))]
    for i, target in enumerate(targets):
        d = sections[f"r{i}"]
        keys = [k for k, _ in d]
        assert len(keys) == len(set(keys)) or keys.count("socket") == 4, keys
        assert keys.count("accept") == 1 and keys.count("connect") == 1, keys
        values = dict(d)
        assert host_port(values["accept"]) == parse(LISTENERS[i % 2])
        assert host_port(values["connect"]) == target
        assert values["client"] == ("yes" if case.role == "CONS" else "no")
        assert set(keys) <= {
            "accept", "connect", "client", "delay", "socket", "TIMEOUTidle", "TIMEOUTconnect",
            "PSKsecrets", "PSKidentity", "sslVersionMin", "sslVersionMax", "ciphersuites",
            "ciphers", "securityLevel",
        }, keys


def check_haproxy(text: str, case: Case, targets: list[Endpoint]) -> None:
    sections = parse_haproxy(text)
    heads = [" ".join(h) for h, _ in sections]
    expected = ["global", "defaults"]
    for i in range(len(targets)):
        expected += [f"frontend r{i}", f"backend t{i}"]
    assert heads == expected
    global_words = sections[0][1]
    assert [w[0] for w in global_words] == ["log", "stats", "tune.pipesize", "ssl-server-verify"]
    assert global_words[1] == ["stats", "socket", "unix@stats.sock", "mode", "600", "level", "operator"]
    for i, target in enumerate(targets):
        front, back = sections[2 + 2 * i][1], sections[3 + 2 * i][1]
        assert [w[0] for w in front] == ["bind", "default_backend"]
        assert front[1] == ["default_backend", f"t{i}"]
        assert host_port(front[0][1].removeprefix("ipv6@")) == parse(LISTENERS[i % 2])
        assert len(back) == 1 and back[0][:2] == ["server", f"t{i}"]
        addr = back[0][2]
        assert addr.startswith("ipv6@") == (":" in addr.removeprefix("ipv6@").rpartition(":")[0])
        assert host_port(addr.removeprefix("ipv6@")) == target
        bind_tail, server_tail = front[0][2:], back[0][3:]
        tls_prod = case.security == "tls" and case.role == "PROD"
        tls_cons = case.security == "tls" and case.role == "CONS"
        prod_bind = "ssl crt /s/gw.pem ssl-min-ver TLSv1.3 ca-file /etc/gw/ca.pem verify required"
        cons_server = (
            "ssl ssl-min-ver TLSv1.3 verify required ca-file /etc/gw/ca.pem crt /s/gw.pem "
            "sni str(gw.example.org) verifyhost gw.example.org"
        )
        assert bind_tail == (prod_bind.split() if tls_prod else [])
        assert server_tail == (cons_server.split() if tls_cons else [])


def check_nginx(text: str, case: Case, targets: list[Endpoint]) -> None:
    top = parse_nginx(text)
    assert [d.name for d in top] == [
        "daemon", "master_process", "worker_processes", "pid", "error_log", "events", "stream",
    ]
    stream = top[-1].block
    assert stream is not None
    servers = [d for d in stream if d.name == "server"]
    assert all(d.block is None for d in stream if d.name != "server")
    assert not [d for d in stream if d.name in ("upstream", "map", "js_set", "include")]
    assert len(servers) == len(targets)
    for i, (server, target) in enumerate(zip(servers, targets, strict=True)):
        assert server.args == [] and server.block is not None
        names = [d.name for d in server.block]
        assert names == ["listen", "proxy_pass", "proxy_socket_keepalive"], names
        listen, proxy_pass, _ = server.block
        assert bracketed(listen.args[0]) == parse(LISTENERS[i % 2])
        assert listen.args[1:] == (["ssl"] if case.security == "tls" and case.role == "PROD" else []) + [
            "so_keepalive=on"
        ]
        assert len(proxy_pass.args) == 1 and bracketed(proxy_pass.args[0]) == target


RENDERERS: dict[str, tuple[list[Case], Callable[[SessionPlan, Case], str], Callable[..., None]]] = {
    "stunnel": (STUNNEL_CASES, lambda p, c: stunnel_config(p, psk_file="/s/psk.txt"), check_stunnel),
    "haproxy": (
        CERT_CASES,
        lambda p, c: haproxy_config(p, stats_socket="stats.sock", certs=c.certs),
        check_haproxy,
    ),
    "nginx": (
        CERT_CASES,
        lambda p, c: nginx_config(p, pid_file="/s/nginx.pid", stream_module="", certs=c.certs),
        check_nginx,
    ),
}


@pytest.mark.parametrize("proxy", list(RENDERERS))
@SETTINGS
@given(texts=st.lists(ENDPOINT_TEXT, min_size=1, max_size=3))
def test_any_endpoint_text_renders_exactly_the_intended_directives(proxy: str, texts: list[str]) -> None:
    cases, render, check = RENDERERS[proxy]
    accepted: list[Endpoint] = []
    for text in texts:
        try:
            parse_endpoint(text)
            accepted.append(parse(normalise(text)))
        except InvalidEndpoint:
            # Refused at the door; and a renderer handed the raw text refuses it too.
            for case in cases:
                with pytest.raises(BackendError):
                    render(make_plan(case, [text]), case)
            continue
    if not accepted:
        return
    for case in cases:
        canonical = render(make_plan(case, [str(ep) for ep in accepted]), case)
        check(canonical, case, accepted)
        # What is written comes from the parsed value, not from the text it was parsed from.
        raw = [t for t in texts if _accepted(t)]
        assert render(make_plan(case, raw), case) == canonical


def _accepted(text: str) -> bool:
    try:
        parse(text)
    except InvalidEndpoint:
        return False
    return True


@pytest.mark.parametrize("payload", INJECTIONS)
def test_the_issue_payloads_are_refused_by_every_renderer(payload: str) -> None:
    with pytest.raises(InvalidEndpoint):
        parse_endpoint(payload)
    for cases, render, _ in RENDERERS.values():
        for case in cases:
            with pytest.raises(BackendError, match="endpoint"):
                render(make_plan(case, ["127.0.0.1:80", payload]), case)


_VALUE = st.one_of(st.text(max_size=40), st.text(alphabet=_ALPHABET, max_size=40))


@SETTINGS
@given(uid=_VALUE, identity=_VALUE, path=_VALUE)
def test_stunnel_other_values_are_one_value_or_refused(uid: str, identity: str, path: str) -> None:
    plan = SessionPlan(uid, "CONS", (RoutePlan("x/0", LISTENERS[0], "127.0.0.1:80"),), "tls", identity, KEY)
    try:
        text = stunnel_config(plan, psk_file=path)
    except BackendError:
        return
    check_stunnel(text, Case("CONS", "tls", None), [parse("127.0.0.1:80")])
    values = dict(parse_stunnel(text)[1]["r0"])
    assert values["PSKidentity"] == identity and values["PSKsecrets"] == path


@SETTINGS
@given(cert=_VALUE, ca=_VALUE, name=_VALUE, sock=_VALUE)
def test_certificate_settings_are_one_word_or_refused(cert: str, ca: str, name: str, sock: str) -> None:
    certs = CertFiles(cert or "c", "/k.pem", ca or "a", name, "/s/gw.pem")
    for role in ("PROD", "CONS"):
        case = Case(role, "tls", certs)
        plan = make_plan(case, ["127.0.0.1:80"])
        try:
            text = haproxy_config(plan, stats_socket=sock or "s", certs=certs)
        except BackendError:
            pass
        else:
            sections = parse_haproxy(text)
            assert [" ".join(h) for h, _ in sections] == ["global", "defaults", "frontend r0", "backend t0"]
            assert sections[0][1][1][:3] == ["stats", "socket", f"unix@{sock or 's'}"]
        try:
            text = nginx_config(plan, pid_file=sock or "p", stream_module="", certs=certs)
        except BackendError:
            continue
        top = parse_nginx(text)
        assert [d.name for d in top][-2:] == ["events", "stream"]
        stream = top[-1].block
        assert stream is not None
        assert sum(d.name == "server" for d in stream) == 1
        for d in stream:
            if d.name in ("ssl_certificate", "proxy_ssl_certificate"):
                assert d.args == [cert or "c"]
            if d.name in ("ssl_client_certificate", "proxy_ssl_trusted_certificate"):
                assert d.args == [ca or "a"]
            if d.name == "proxy_ssl_name":
                assert d.args == [name.lower()]  # a host name, kept lower-case
