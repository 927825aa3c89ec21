"""No open relay: the target policy, decided before any connection."""

from __future__ import annotations

import asyncio

import pytest

from scistream.s2cs.targets import TargetPolicy, TargetRefused


def check(policy: TargetPolicy, ep: str) -> None:
    asyncio.run(policy.check(ep))


@pytest.mark.parametrize(
    "ep",
    ["169.254.169.254:80", "[fe80::1]:80", "224.0.0.1:5000", "0.0.0.0:5000", "[::ffff:169.254.169.254]:80"],
)
def test_always_refused(ep: str) -> None:
    for listener in ("127.0.0.1", "10.0.0.5"):
        with pytest.raises(TargetRefused):
            check(TargetPolicy(listener), ep)


def test_loopback_only_for_single_host_gateway() -> None:
    with pytest.raises(TargetRefused, match="loopback"):
        check(TargetPolicy("192.168.10.11"), "127.0.0.1:5074")
    with pytest.raises(TargetRefused, match="loopback"):
        check(TargetPolicy("192.168.10.11"), "localhost:5074")
    check(TargetPolicy("127.0.0.1"), "127.0.0.1:5074")
    check(TargetPolicy("::1"), "[::1]:5074")


def test_own_control_ports_refused() -> None:
    pol = TargetPolicy("127.0.0.1", own_ports=[5000, 9100])
    for ep in ("127.0.0.1:5000", "127.0.0.1:9100"):
        with pytest.raises(TargetRefused, match="own control"):
            check(pol, ep)
    check(pol, "127.0.0.1:5001")
    pol2 = TargetPolicy("10.0.0.5", own_ports=[5000])
    with pytest.raises(TargetRefused, match="own control"):
        check(pol2, "10.0.0.5:5000")
    check(pol2, "10.0.0.6:5000")  # another host's 5000 is fine


def test_allow_list() -> None:
    pol = TargetPolicy("10.0.0.5", allow=["192.168.20.0/24"])
    check(pol, "192.168.20.10:5074")
    with pytest.raises(TargetRefused, match="outside"):
        check(pol, "8.8.8.8:53")
    default = TargetPolicy("10.0.0.5")
    check(default, "8.8.8.8:53")
    check(default, "192.168.20.10:5074")


@pytest.mark.parametrize("ep", ["", "nohost", "1.2.3.4:99999", "bad host:1", "[zz]:1"])
def test_malformed(ep: str) -> None:
    with pytest.raises(TargetRefused):
        check(TargetPolicy("127.0.0.1"), ep)
