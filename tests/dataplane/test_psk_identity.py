"""The right key under another PSK identity is refused (issue 14, item 5).

Until now only the C test (tests/c, skipped without a compiler) caught an engine that
stopped comparing identities. A TLS 1.3 binder proves the key, not the identity, so
without the check any holder of one session's key would be let in under any name. These
tests go through the Python API of the native engine and through `s2ds forward`, with
``openssl s_client`` as the peer (TLS 1.3 external PSK, and TLS 1.2 PSK in compat mode)
and with an engine client route; every refusal has a positive control with the same tool
and the right identity.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from dputil import ServerFactory, outcome, psk_tls, secret_target, tls_pair
from streams import StreamServer, connect, wait_for

from scistream.dataplane import COMPAT_PSK_IDENTITY, EngineBase, Route, TlsMode, TlsRole

SECRET = b"producer-bytes-for-the-right-identity-only"
KEY = bytes(range(32))
IDENTITY = "session-7f3a"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def s_client(address: str, mode: TlsMode, identity: str, key: bytes) -> subprocess.CompletedProcess[bytes]:
    """openssl s_client with an external PSK: TLS 1.3 (SHA-256 suite) in psk mode, TLS 1.2
    PSK suites in compat mode."""
    proto = (["-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"] if mode is TlsMode.PSK
             else ["-tls1_2", "-cipher", "PSK:@SECLEVEL=0"])
    return subprocess.run(["openssl", "s_client", "-connect", address, "-quiet", *proto,
                           "-psk_identity", identity, "-psk", key.hex()],
                          input=b"client line\n", capture_output=True, timeout=20, check=False)


def own_identity(mode: TlsMode) -> str:
    return IDENTITY if mode is TlsMode.PSK else COMPAT_PSK_IDENTITY


def assert_target_untouched(target: StreamServer) -> None:
    for s in target.served:
        s.done.wait(15)
        assert s.results.get("got", b"") == b"", "a byte of the wrong identity reached the target"


@needs_openssl
@pytest.mark.parametrize("other", ["other", "client2", ""], ids=["other", "client2", "prefix"])
@pytest.mark.parametrize("mode", [TlsMode.PSK, TlsMode.COMPAT])
def test_listener_refuses_right_key_under_another_identity(
        make_native_engine: Callable[..., EngineBase], stream_server: ServerFactory,
        mode: TlsMode, other: str) -> None:
    engine = make_native_engine()
    target = secret_target(stream_server, SECRET)
    mine = own_identity(mode)
    # "prefix": the identity cut short by one character, so a check that compares only
    # the caller's length (strncmp, memcmp of the shorter) is caught too.
    wrong = other or mine[:-1]
    info = engine.add_route(Route("in", "127.0.0.1:0", (target.address,),
                                  tls=psk_tls(TlsRole.SERVER, key=KEY, mode=mode, identity=mine)))
    bad = s_client(info.bound, mode, wrong, KEY)
    assert SECRET not in bad.stdout
    route = engine.stats("in").routes["in"]
    assert wait_for(lambda: engine.stats("in").routes["in"].errors.get("tls_handshake", 0) >= 1, 10), route
    assert wait_for(lambda: engine.stats("in").routes["in"].connections_active == 0, 10)
    route = engine.stats("in").routes["in"]
    assert route.bytes_to_target == 0 and route.bytes_from_target == 0, route
    assert_target_untouched(target)
    # Positive control: the same tool, same key, the route's own identity.
    ok = s_client(info.bound, mode, mine, KEY)
    assert SECRET in ok.stdout, ok.stderr.decode(errors="replace")


@pytest.mark.parametrize("mode", [TlsMode.PSK, TlsMode.COMPAT])
def test_engine_pair_with_right_key_and_another_identity_refused(
        make_native_engine: Callable[..., EngineBase], stream_server: ServerFactory, mode: TlsMode) -> None:
    engine = make_native_engine()
    target = secret_target(stream_server, SECRET)
    bound = tls_pair(engine, target.address,
                     psk_tls(TlsRole.CLIENT, key=KEY, mode=mode, identity="someone-else"),
                     psk_tls(TlsRole.SERVER, key=KEY, mode=mode, identity=own_identity(mode)))
    with connect(bound) as c:
        c.sendall(b"consumer bytes that must not reach the producer\n")
        assert outcome(c, timeout=10) in ("eof", "reset"), "the wrong identity got data through"
    assert wait_for(lambda: engine.stats("tls-in").routes["tls-in"].errors.get("tls_handshake", 0) >= 1, 10)
    assert wait_for(lambda: all(r.connections_active == 0 for r in engine.stats().routes.values()), 10)
    st = engine.stats("tls-in").routes["tls-in"]
    assert st.bytes_to_target == 0 and st.bytes_from_target == 0, st
    assert_target_untouched(target)


@needs_openssl
def test_s2ds_forward_refuses_right_key_under_another_identity(
        tmp_path: Path, native_impl: str, stream_server: ServerFactory,
        spawn: Callable[..., subprocess.Popen[str]]) -> None:
    """The same through the standalone forwarder's command line (--psk-file, --psk-identity)."""
    target = secret_target(stream_server, SECRET)
    psk = tmp_path / "psk.txt"
    psk.write_text(f"{IDENTITY}:{KEY.hex()}\n")
    psk.chmod(0o600)
    fwd = spawn([sys.executable, "-m", "scistream.s2ds", "forward", "--listen", "127.0.0.1:0",
                 "--to", target.address, "--tls", "server", "--psk-file", str(psk),
                 "--psk-identity", IDENTITY, "--engine", native_impl],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert fwd.stdout is not None
    first = fwd.stdout.readline()
    assert first.startswith("listening on "), first + (fwd.stderr.read() if fwd.stderr else "")
    bound = first.split()[2]
    bad = s_client(bound, TlsMode.PSK, "other", KEY)
    assert SECRET not in bad.stdout
    assert_target_untouched(target)
    ok = s_client(bound, TlsMode.PSK, IDENTITY, KEY)
    assert SECRET in ok.stdout, ok.stderr.decode(errors="replace")
