"""Who seals TLS 1.3 AES-GCM records: intel-ipsec-mb or OpenSSL (Tuning.tls_aes_gcm).

csrc/aesgcm.c hands OpenSSL an AES-GCM from Intel's library on CPUs with VAES. A gateway
that has it must talk to one that has not (and to stunnel and openssl, which
tests/integration/test_tls_interop.py runs against the default choice): here the two
routes of a TLS pair run in two engines, one per implementation, both ways round, with a
key update every 256 KiB, in both key sizes (AES-128 with a PSK, AES-256 with
certificates). The provider's own cross-check against OpenSSL, byte by byte with random
keys, nonces and lengths, is tests/c (test_aesgcm_provider).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dputil import ServerFactory, cert_tls, duplex_server, psk_tls
from streams import MiB, duplex_transfer, pattern_digest

from scistream.dataplane import EngineBase, InvalidRoute, Route, Tls, TlsMode, TlsRole, Tuning

LOGGER = "scistream.dataplane.native"
TIMEOUT = 30.0


def engine_log(engine: EngineBase, caplog: pytest.LogCaptureFixture) -> list[str]:
    engine.stats()  # drains the engine's log into logging
    return [r.getMessage() for r in caplog.records if "AES-GCM" in r.getMessage()]


def ipsec_mb_unusable(make_native_engine: Callable[..., EngineBase]) -> str | None:
    """Why this build or CPU cannot use the library (None if it can)."""
    try:
        make_native_engine(Tuning(tls_aes_gcm="ipsec-mb"))
    except InvalidRoute as exc:
        return str(exc)
    return None


def test_the_engine_says_who_seals_the_records(make_native_engine: Callable[..., EngineBase],
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=LOGGER)
    why_not = ipsec_mb_unusable(make_native_engine)
    auto = engine_log(make_native_engine(Tuning()), caplog)
    if why_not is None:
        assert auto[-1] == "TLS 1.3 AES-GCM by intel-ipsec-mb (VAES, AVX-512)", auto
    else:
        # Asked for and unusable: the engine does not start, and says why in one sentence.
        assert why_not.startswith("AES-GCM by intel-ipsec-mb was asked for, but "), why_not
        reason = why_not.split(", but ", 1)[1]
        assert auto[-1] == f"TLS 1.3 AES-GCM by OpenSSL: {reason}", auto
    caplog.clear()
    assert engine_log(make_native_engine(Tuning(tls_aes_gcm="openssl")), caplog) == [
        "TLS 1.3 AES-GCM by OpenSSL"
    ]


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(InvalidRoute, match="tls_aes_gcm 'aesni' is not one of auto, openssl, ipsec-mb"):
        Tuning(tls_aes_gcm="aesni")


def leg(kind: str, role: TlsRole, certs: Any) -> Tls:
    if kind == "psk-aes128":
        return psk_tls(role)
    base = cert_tls(role, certs)
    return Tls(role=role, mode=TlsMode.CERT, cert_file=base.cert_file, key_file=base.key_file,
               ca_file=base.ca_file, ciphers="TLS_AES_256_GCM_SHA384")


@pytest.mark.parametrize("kind", ["psk-aes128", "cert-aes256"])
@pytest.mark.parametrize("server_side,client_side", [("openssl", "ipsec-mb"), ("ipsec-mb", "openssl")])
def test_either_implementation_talks_to_the_other(kind: str, server_side: str, client_side: str,
                                                  make_native_engine: Callable[..., EngineBase],
                                                  stream_server: ServerFactory, certs: Any) -> None:
    why_not = ipsec_mb_unusable(make_native_engine)
    if why_not is not None:
        pytest.skip(why_not)
    rekey = 256 * 1024
    server_engine = make_native_engine(Tuning(tls_aes_gcm=server_side, tls_key_update_bytes=rekey))
    client_engine = make_native_engine(Tuning(tls_aes_gcm=client_side, tls_key_update_bytes=rekey))
    per_conn = 3 * MiB + 12_345
    server = duplex_server(stream_server, per_conn)
    inner = server_engine.add_route(Route("in", "127.0.0.1:0", (server.address,),
                                          tls=leg(kind, TlsRole.SERVER, certs)))
    outer = client_engine.add_route(Route("out", "127.0.0.1:0", (inner.bound,),
                                          tls=leg(kind, TlsRole.CLIENT, certs)))
    sent, got = duplex_transfer(outer.bound, send_bytes=per_conn, seed=11, timeout=TIMEOUT)
    served = server.wait_served(1, timeout=TIMEOUT)[0]
    assert served.error is None, served.error
    assert served.results["got"] == (per_conn, sent) == (per_conn, pattern_digest(per_conn, 11))
    assert got == (per_conn, served.results["sent"])
    for eng, rid in ((server_engine, "in"), (client_engine, "out")):
        route = eng.stats(rid).routes[rid]
        assert route.errors.get("io", 0) == 0 and route.errors.get("tls_handshake", 0) == 0, route.errors
