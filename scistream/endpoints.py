"""Parsing and formatting of ``host:port`` endpoints, the protocol's address form.

1.x peers send IPv4 ``a.b.c.d:port``; we also accept hostnames and bracketed
IPv6 ``[::1]:port``.
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


class InvalidEndpoint(ValueError):
    """An endpoint string that is not ``host:port``; the message says why."""


def parse_endpoint(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` into (host, port); host has no brackets."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise InvalidEndpoint(f"endpoint {text!r} is not of the form host:port")
    s = text.strip()
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or s[close + 1 : close + 2] != ":":
            raise InvalidEndpoint(f"endpoint {text!r}: IPv6 must be written [addr]:port")
        host, port_text = s[1:close], s[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidEndpoint(f"endpoint {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep or not host:
            raise InvalidEndpoint(f"endpoint {text!r} is not of the form host:port")
        if ":" in host:
            raise InvalidEndpoint(f"endpoint {text!r}: write an IPv6 address as [addr]:port")
        # A name whose last label is all digits is no host name (no top-level domain is
        # numeric): it was meant as an IPv4 address, and 999.1.1.1 is none.
        if not _HOSTNAME.match(host) or host.rpartition(".")[2].isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise InvalidEndpoint(f"endpoint {text!r}: {host!r} is not a host name or address") from None
    if not port_text.isdigit():
        raise InvalidEndpoint(f"endpoint {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise InvalidEndpoint(f"endpoint {text!r}: port {port} is out of range")
    return host, port


def format_endpoint(host: str, port: int) -> str:
    """The inverse of parse_endpoint: brackets IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_port_range(text: str) -> tuple[int, int]:
    """``5100-5200`` (inclusive) or a single port ``5100``."""
    s = str(text).strip()
    lo_text, sep, hi_text = s.partition("-")
    if not lo_text.strip().isdigit() or (sep and not hi_text.strip().isdigit()):
        raise InvalidEndpoint(f"port range {text!r} is not of the form LOW-HIGH")
    lo = int(lo_text)
    hi = int(hi_text) if sep else lo
    if not 1 <= lo <= hi <= 65535:
        raise InvalidEndpoint(f"port range {text!r} must satisfy 1 <= LOW <= HIGH <= 65535")
    return lo, hi
