"""Parsing and formatting of ``host:port`` endpoints, the protocol's address form.

1.x peers send IPv4 ``a.b.c.d:port``; we also accept host names and bracketed
IPv6 ``[::1]:port``. Endpoint text comes from clients (hello, update) and ends
up in proxy configuration files, so the grammar is strict and a parsed
endpoint is a normalised value (:class:`Endpoint`), never the text it came from:

* host: a host name per RFC 1123 (labels of ``[A-Za-z0-9-]``, no ``-`` at either
  end of a label, at most 63 characters each and 253 in all; kept lower-case;
  a name whose last label is all digits, or that the C library would read as
  a number, is refused: it is a malformed address, not a name), a dotted-quad
  IPv4 address, or a bracketed IPv6 address with no scope id or one that is
  an interface name (at most 15 characters of ``[A-Za-z0-9_.-]``);
* an IPv4-mapped IPv6 address (``[::ffff:a.b.c.d]``) is the IPv4 address
  a.b.c.d: the target policy checks and the proxies connect to the same value;
* port: ASCII digits only (``str.isdigit`` also takes ``²``), 1..65535 (0 only
  where the caller binds and lets the kernel choose).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from scistream.clienttext import excerpt

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Longest endpoint text looked at: "[" + 45 (IPv6 with embedded IPv4) + "%" + 15 + "]:65535"
#: is 69, a host name 253 + ":65535"; anything longer is not an endpoint.
MAX_ENDPOINT_CHARS = 300
#: Longest IPv6 scope id: an interface name (IFNAMSIZ - 1 on Linux).
MAX_SCOPE_CHARS = 15

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*", re.ASCII)
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", re.ASCII)
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}", re.ASCII)
_SCOPE = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_SCOPE_CHARS}}}", re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)


class InvalidEndpoint(ValueError):
    """An endpoint string that is not ``host:port``; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    """A validated endpoint: an address object or a validated lower-case host name, and a port.

    ``str()`` gives the canonical text (IPv6 bracketed); it is built from these
    values only, so it holds nothing the grammar does not allow.
    """

    host: ipaddress.IPv4Address | ipaddress.IPv6Address | str
    port: int

    @property
    def address(self) -> IPAddress | None:
        """The IP address, or None for a host name."""
        return None if isinstance(self.host, str) else self.host

    @property
    def host_text(self) -> str:
        return str(self.host)

    def __str__(self) -> str:
        return format_endpoint(self.host_text, self.port)


def _fail(text: str, why: str) -> InvalidEndpoint:
    return InvalidEndpoint(f"endpoint {excerpt(text)} {why}")


def _ipv6(text: str, inner: str) -> IPAddress:
    addr_text, pct, scope = inner.partition("%")
    if not _IPV6.fullmatch(addr_text):
        raise _fail(text, "is not a valid IPv6 address in brackets")
    if pct and not _SCOPE.fullmatch(scope):
        raise _fail(
            text,
            f"has an IPv6 scope id that is not an interface name (at most {MAX_SCOPE_CHARS} "
            "characters of letters, digits, '_', '.' and '-')",
        )
    try:
        addr = ipaddress.IPv6Address(addr_text)
    except ValueError:
        raise _fail(text, "is not a valid IPv6 address in brackets") from None
    if addr.ipv4_mapped is not None:
        if pct:
            raise _fail(text, "has a scope id on an IPv4-mapped address, which has none")
        return addr.ipv4_mapped
    return ipaddress.IPv6Address(f"{addr_text}%{scope}") if pct else addr


def _ipv4_or_name(text: str, host: str) -> ipaddress.IPv4Address | str:
    if _IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            raise _fail(text, "has an IPv4 address with a part above 255 or a leading zero") from None
    name = host.lower()
    if not _HOSTNAME.fullmatch(name):
        raise _fail(text, "has a host that is not a valid host name or IPv4 address")
    if name.rsplit(".", 1)[-1].isdigit() or _c_library_number(name):
        # "10.1", "127.1", "0x7f000001": getaddrinfo reads these as addresses.
        raise _fail(text, "has a host that is neither a dotted-quad IPv4 address nor a host name")
    return name


def _c_library_number(name: str) -> bool:
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True


def parse(text: str, *, allow_port_zero: bool = False) -> Endpoint:
    """``host:port`` / ``[v6]:port`` as an :class:`Endpoint`; InvalidEndpoint says why not."""
    if not isinstance(text, str) or not text:
        raise InvalidEndpoint("the endpoint is empty; write host:port")
    if len(text) > MAX_ENDPOINT_CHARS:
        raise _fail(text, f"is longer than {MAX_ENDPOINT_CHARS} characters")
    # Blanks around an item of a comma-separated list are forgiven; nothing else is.
    s = text.strip(" \t")
    host: IPAddress | str
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or s[close + 1 : close + 2] != ":":
            raise _fail(text, "is not of the form [IPv6]:port")
        host = _ipv6(text, s[1:close])
        port_text = s[close + 2 :]
    else:
        host_text, sep, port_text = s.rpartition(":")
        if not sep or not host_text:
            raise _fail(text, "is not of the form host:port")
        if ":" in host_text:
            raise _fail(text, "has an IPv6 address without brackets; write [address]:port")
        host = _ipv4_or_name(text, host_text)
    if not _PORT.fullmatch(port_text):
        raise _fail(text, "has a port that is not a number of at most 5 ASCII digits")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise _fail(text, f"has port {port}, out of range ({0 if allow_port_zero else 1}..65535)")
    return Endpoint(host, port)


def parse_endpoint(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """(host, port) of ``host:port`` / ``[v6]:port``: the host normalised, without brackets."""
    ep = parse(text, allow_port_zero=allow_port_zero)
    return ep.host_text, ep.port


def normalise(text: str, *, allow_port_zero: bool = False) -> str:
    """The canonical text of an endpoint (what flows on instead of the client's text)."""
    return str(parse(text, allow_port_zero=allow_port_zero))


def parse_host_name(text: str) -> str:
    """A TLS server name: a host name or dotted-quad IPv4 address, normalised, or
    InvalidEndpoint."""
    if not isinstance(text, str) or not text or len(text) > 253:
        raise InvalidEndpoint(f"{excerpt(text)} is not a host name")
    try:
        return str(_ipv4_or_name(text, text))
    except InvalidEndpoint:
        raise InvalidEndpoint(f"{excerpt(text)} is not a host name or IPv4 address") from None


def url_uses_tls(url: str) -> bool:
    """Whether a service URL (an etcd member's, say) is https:// (``host:port`` alone is not)."""
    return url.strip().lower().startswith("https://")


def format_endpoint(host: str | IPAddress, port: int) -> str:
    """The inverse of parse_endpoint: brackets IPv6 literals."""
    h = str(host)
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


def parse_port_range(text: str) -> tuple[int, int]:
    """``5100-5200`` (inclusive) or a single port ``5100``."""
    s = str(text).strip()
    lo_text, sep, hi_text = s.partition("-")
    lo_text, hi_text = lo_text.strip(), hi_text.strip()
    if not _PORT.fullmatch(lo_text) or (sep and not _PORT.fullmatch(hi_text)):
        raise InvalidEndpoint(f"port range {excerpt(text)} is not of the form LOW-HIGH")
    lo = int(lo_text)
    hi = int(hi_text) if sep else lo
    if not 1 <= lo <= hi <= 65535:
        raise InvalidEndpoint(f"port range {excerpt(text)} must satisfy 1 <= LOW <= HIGH <= 65535")
    return lo, hi
