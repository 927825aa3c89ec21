"""The endpoint grammar (issue 14 item 1): what a client may write as host:port, and the
normalised value that flows on instead of its text."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scistream.endpoints import (
    Endpoint,
    InvalidEndpoint,
    normalise,
    parse,
    parse_endpoint,
    parse_host_name,
    parse_port_range,
)
from scistream.s2cs.targets import TargetPolicy, TargetRefused

#: What the canonical text of any endpoint may hold, and nothing else.
CANONICAL = re.compile(r"(?:[a-z0-9.-]+|\[[0-9a-f:.]+(?:%[A-Za-z0-9_.-]{1,15})?\]):[0-9]{1,5}")
#: The stunnel payload of issue 14 (ports changed only).
STUNNEL_PAYLOAD = "[::ffff:192.0.2.2%lo:1\nconnect = 127.0.0.1:28081\n;]:28082"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("192.0.2.7:5074", ipaddress.IPv4Address("192.0.2.7"), 5074),
        ("  192.0.2.7:5074\t", ipaddress.IPv4Address("192.0.2.7"), 5074),
        ("[::1]:80", ipaddress.IPv6Address("::1"), 80),
        ("[2001:DB8:0:0::1]:443", ipaddress.IPv6Address("2001:db8::1"), 443),
        ("[fe80::1%eth0]:80", ipaddress.IPv6Address("fe80::1%eth0"), 80),
        ("[fe80::1%br-0a1b2c3d4e5f]:80", ipaddress.IPv6Address("fe80::1%br-0a1b2c3d4e5f"), 80),
        ("[::ffff:192.0.2.2]:80", ipaddress.IPv4Address("192.0.2.2"), 80),  # checked and rendered as IPv4
        ("Gateway-1.Example.ORG:5000", "gateway-1.example.org", 5000),
        ("localhost:65535", "localhost", 65535),
        ("x" * 63 + ".example:1", "x" * 63 + ".example", 1),
    ],
)
def test_accepted_endpoints_are_normalised_values(text: str, host: object, port: int) -> None:
    ep = parse(text)
    assert ep == Endpoint(host, port)  # type: ignore[arg-type]
    assert type(ep.host) is type(host)
    assert parse_endpoint(text) == (str(host), port)
    assert CANONICAL.fullmatch(normalise(text))
    assert parse(normalise(text)) == ep


@pytest.mark.parametrize(
    "text",
    [
        STUNNEL_PAYLOAD,
        "[::1%lo\n]:80",
        "[::1%lo]:80\n",
        "[::1%]:80",
        "[fe80::1%" + "a" * 16 + "]:80",  # longer than an interface name
        "[fe80::1%e th0]:80",
        "[fe80::1%eth0;x]:80",
        "[fe80::1%${SECRET}]:80",
        '[fe80::1%"a"]:80',
        "[fe80::1%eth0/1]:80",
        "[fe80::1%éth0]:80",
        "[::ffff:192.0.2.2%lo]:80",  # an IPv4-mapped address has no scope
        "[::1]80",
        "[::1:80",
        "::1:80",
        "[1.2.3.4]:80",
        "[::g]:80",
        "host\n:80",  # re's '$' matches before a trailing newline
        "host:80\n",
        "\nhost:80",
        "host\r:80",
        "ho st:80",
        "host_name:80",
        "-host:80",
        "host-:80",
        "a..b:80",
        ".host:80",
        "host.:80",
        "x" * 64 + ".example:80",  # a label is at most 63 characters
        ".".join(["abcdefghi"] * 26) + ":80",  # 259 characters of name
        "999.1.1.1:80",
        "1.2.3.4.5:80",
        "127.1:80",  # getaddrinfo reads this as 127.0.0.1
        "0x7f000001:80",
        "01.2.3.4:80",
        "256.1.1.1:80",
        "1.2.3.4:²",  # str.isdigit() takes it
        "1.2.3.4:٨٠",  # Arabic-Indic digits: int() takes them
        "1.2.3.4:+80",
        "1.2.3.4: 80",
        "1.2.3.4:0x50",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:999999",
        "1.2.3.4:",
        ":80",
        "1.2.3.4",
        "",
        "host:80:81",
    ],
)
def test_refused(text: str) -> None:
    with pytest.raises(InvalidEndpoint):
        parse(text)


def test_port_zero_only_where_asked() -> None:
    assert parse("127.0.0.1:0", allow_port_zero=True).port == 0
    with pytest.raises(InvalidEndpoint, match="out of range"):
        parse("127.0.0.1:0")


def test_the_error_quotes_a_bounded_escaped_excerpt() -> None:
    with pytest.raises(InvalidEndpoint) as info:
        parse("a" * 900_000 + ":1")
    message = str(info.value)
    assert len(message) < 300 and "(900002 bytes)" in message
    with pytest.raises(InvalidEndpoint) as info:
        parse(STUNNEL_PAYLOAD)
    message = str(info.value)
    assert "\n" not in message and "\\n" in message and message.isprintable()


def test_server_names() -> None:
    assert parse_host_name("GW.example.org") == "gw.example.org"
    assert parse_host_name("192.0.2.1") == "192.0.2.1"
    for bad in ("gw.example.org)", "gw example", "gw\n", "", "a" * 254, "${X}"):
        with pytest.raises(InvalidEndpoint):
            parse_host_name(bad)


def test_port_range_takes_ascii_digits_only() -> None:
    assert parse_port_range("5100-5200") == (5100, 5200)
    assert parse_port_range(" 5100 ") == (5100, 5100)
    for bad in ("5100-52\u0660\u0660", "\u00b2-3", "5200-5100", "0-10", "a-b", "5100-"):
        with pytest.raises(InvalidEndpoint):
            parse_port_range(bad)


_ENDPOINT_ALPHABET = string.ascii_letters + string.digits + "[]:.%-_ \t\n\r;=$\"'{}#\\/²٨\x00\x85\u2028é"


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(alphabet=_ENDPOINT_ALPHABET, max_size=60),
        st.builds(
            lambda a, s, p: f"[{a}%{s}]:{p}",
            st.ip_addresses(v=6).map(str),
            st.text(alphabet=_ENDPOINT_ALPHABET, max_size=20),
            st.text(alphabet=string.digits + "²٨ ", min_size=1, max_size=6),
        ),
        st.builds(
            lambda a, p: f"{a}:{p}",
            st.ip_addresses(v=4).map(str),
            st.integers(-1, 70000),
        ),
        st.builds(
            lambda h, p: f"{h}:{p}",
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.\-\n]{0,70}", fullmatch=True),
            st.integers(0, 70000),
        ),
    )
)
def test_any_text_is_refused_or_becomes_a_canonical_value(text: str) -> None:
    try:
        ep = parse(text)
    except InvalidEndpoint as exc:
        message = str(exc)
        assert message.isprintable() and len(message) < 400
        return
    canonical = str(ep)
    assert CANONICAL.fullmatch(canonical), canonical
    assert 1 <= ep.port <= 65535
    assert parse(canonical) == ep  # normalising is idempotent
    if ep.address is not None:
        assert ep.address.version == 4 or ep.address.ipv4_mapped is None


# -- the target policy sees the parsed value ------------------------------------------------


def _check(policy: TargetPolicy, ep: str) -> None:
    asyncio.run(policy.check(ep))


def test_the_policy_checks_what_the_proxy_is_told() -> None:
    policy = TargetPolicy("10.0.0.5", allow=["192.0.2.0/24"])
    _check(policy, "[::ffff:192.0.2.2]:80")  # the IPv4 address, inside the allow-list
    assert normalise("[::ffff:192.0.2.2]:80") == "192.0.2.2:80"  # and what the proxy gets
    for refused in ("[::ffff:10.1.1.1]:80", "[::ffff:192.0.2.2%lo]:80", STUNNEL_PAYLOAD):
        with pytest.raises(TargetRefused):
            _check(policy, refused)


def test_a_scope_id_does_not_hide_the_gateways_own_ports() -> None:
    policy = TargetPolicy("2001:db8::5", own_ports=[5000])
    for ep in ("[2001:db8::5]:5000", "[2001:db8::5%eth0]:5000"):
        with pytest.raises(TargetRefused, match="own control"):
            _check(policy, ep)
    _check(policy, "[2001:db8::5%eth0]:5001")
