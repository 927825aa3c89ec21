"""No open relay: which addresses a session may make the gateway connect to.

Checked when a hello or an update names endpoints, before any connection is
attempted (RELIABILITY 10):

* link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10),
  multicast, unspecified and reserved addresses: always refused;
* the gateway's own control, metrics and events ports on its own addresses:
  always refused;
* loopback: refused unless the gateway's listener address is itself loopback
  (a single-host deployment: tests, ``scistream demo``, tutorials on one machine);
* everything else must fall in the allow-list (``--allow-target CIDR``); with no
  allow-list every other unicast address is allowed.

Host names are resolved here and every address they resolve to must pass.
Endpoints are checked as parsed values (scistream.endpoints): an IPv4-mapped
IPv6 address is its IPv4 address, and a scope id is an interface name, so what
is checked is what the proxies are told to connect to. Refusals quote the
client's text only as a bounded, escaped excerpt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from scistream.clienttext import excerpt
from scistream.endpoints import Endpoint, InvalidEndpoint, parse

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


class TargetRefused(Exception):
    """A target that policy refuses, or that is not a valid endpoint; one sentence."""


def _plain(addr: IPAddress) -> IPAddress:
    # ::ffff:a.b.c.d is the IPv4 address for every rule below, and a scope id
    # changes nothing about which host an address is (IPv6Address.__eq__ would
    # otherwise tell [a%eth0] from [a] and let it past the own-ports rule).
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(int(addr))
    return addr


class TargetPolicy:
    def __init__(
        self,
        listener_ip: str,
        allow: Iterable[str] = (),
        own_ports: Iterable[int] = (),
        resolve_timeout: float = 3.0,
    ) -> None:
        self.allow: list[IPNetwork] = [ipaddress.ip_network(c, strict=False) for c in allow]
        self.own_ports: set[int] = {p for p in own_ports if p}
        self.resolve_timeout = resolve_timeout
        self.listener_ip = listener_ip
        try:
            self._listener_addr: IPAddress | None = _plain(ipaddress.ip_address(listener_ip))
        except ValueError:
            self._listener_addr = None
        self.loopback_ok = self._listener_addr is not None and self._listener_addr.is_loopback

    def add_own_port(self, port: int) -> None:
        if port:
            self.own_ports.add(port)

    def _own_address(self, addr: IPAddress) -> bool:
        return addr.is_loopback or addr.is_unspecified or addr == self._listener_addr

    def check_address(self, addr: IPAddress, port: int, text: str) -> None:
        addr = _plain(addr)
        if any(addr in net for net in _LINK_LOCAL if addr.version == net.version):
            raise TargetRefused(
                f"target {text} is a link-local address, which this gateway never connects to"
            )
        if addr.is_multicast or addr.is_unspecified or (addr.is_reserved and not addr.is_loopback):
            raise TargetRefused(f"target {text} is not a unicast address")
        if port in self.own_ports and self._own_address(addr):
            raise TargetRefused(f"target {text} is one of this gateway's own control ports")
        if addr.is_loopback and not self.loopback_ok:
            raise TargetRefused(
                f"target {text} is a loopback address, allowed only when the gateway's "
                "listener address is loopback"
            )
        if (
            self.allow
            and not addr.is_loopback
            and not any(addr in net for net in self.allow if addr.version == net.version)
        ):
            raise TargetRefused(f"target {text} is outside the networks this gateway may connect to")

    async def check(self, endpoint: str | Endpoint) -> None:
        """Raise TargetRefused unless ``endpoint`` may be a target."""
        if isinstance(endpoint, Endpoint):
            ep = endpoint
        else:
            try:
                ep = parse(endpoint)
            except InvalidEndpoint as exc:
                raise TargetRefused(str(exc)) from None
        text = str(ep)  # canonical, built from the parsed values: safe to quote
        if ep.address is not None:
            addrs: list[IPAddress] = [ep.address]
        else:
            addrs = await self._resolve(ep.host_text, text)
        for addr in addrs:
            self.check_address(addr, ep.port, text)

    async def _resolve(self, host: str, text: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), self.resolve_timeout
            )
        except (OSError, TimeoutError):
            raise TargetRefused(f"target {text}: host name {excerpt(host)} does not resolve") from None
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addrs:
            raise TargetRefused(f"target {text}: host name {excerpt(host)} does not resolve")
        return addrs
