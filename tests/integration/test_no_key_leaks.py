"""No data-channel key in what s2uc and the demo print (issue 14, item 5).

The per-session key must reach only the s2cs stores, the user's private session store and
a --key-file asked for by name. These tests run every s2uc command that touches a session
(inbound-request, outbound-request, prod-req, cons-req, stream, check-status, list,
list --local, release), in --json and in text form, with -v on some, against two real s2cs;
the demo runs as users run it (--json and plain, --keep so its keys can be read while it
runs). The keys are read from where they legitimately live (each s2cs's SQLite store, the
s2uc session store) and none of their usual spellings may appear in any stdout, stderr or
log: hex (both cases), base64 (standard and URL-safe), Python's bytes repr, or the first
half of the key in hex.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from s2cs_process import PairEnv, gateway_pair

from scistream.certs import make_self_signed
from scistream.dataplane import native_available

pytestmark = [
    pytest.mark.skipif(not native_available(), reason="TLS sessions (with keys) need the native engine"),
    pytest.mark.timeout(180),
]


def key_spellings(key: bytes) -> set[str]:
    """The ways a key is commonly printed by mistake."""
    return {
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode().rstrip("="),
        base64.urlsafe_b64encode(key).decode().rstrip("="),
        repr(key)[2:-1],
        key[: len(key) // 2].hex(),
    }


def assert_no_key(keys: Iterable[bytes], texts: dict[str, str]) -> None:
    keys = set(keys)
    assert keys, "no key was collected: the check would prove nothing"
    for key in keys:
        for spelling in key_spellings(key):
            for where, text in texts.items():
                if spelling in text:  # not an assert: its message would print the key again
                    pytest.fail(f"a session key (spelled {spelling[:6]}...) appears in {where}")


def keys_in_db(db: Path) -> set[bytes]:
    if not db.exists():
        return set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {bytes(psk) for (psk,) in conn.execute("SELECT psk FROM sessions") if psk}


def keys_in_s2uc_home(home: Path) -> set[bytes]:
    out = set()
    for rec in (home / "sessions").glob("*.json"):
        if key := json.loads(rec.read_text()).get("session_key"):
            out.add(bytes.fromhex(key))
    return out


@dataclass
class Env(PairEnv):
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return Path(self.env["SCISTREAM_HOME"])

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["s2uc", *args], capture_output=True, text=True, env=self.env, cwd=self.dir,
                             timeout=60, check=False)
        name = " ".join(args[:2])
        self.texts[f"stdout of s2uc {name} (#{len(self.texts)})"] = res.stdout
        self.texts[f"stderr of s2uc {name} (#{len(self.texts)})"] = res.stderr
        if ok:
            assert res.returncode == 0, res.stdout + res.stderr
        return res

    def keys(self) -> set[bytes]:
        """Every key the gateways and the user's store hold right now (read before release:
        a released session's key is wiped)."""
        found = keys_in_s2uc_home(self.home)
        for name in ("prod", "cons"):
            found |= keys_in_db(self.dir / f"state-{name}" / "s2cs.db")
        return found

    def logs(self) -> dict[str, str]:
        paths = [self.prod.log, self.cons.log, *self.dir.glob("state-*/*.log")]
        return {f"log {p.name}": p.read_text(errors="replace") for p in paths}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("keyleaks")
    cert, key = make_self_signed(d, ["127.0.0.1"], ["localhost"])
    args = (f"--server_crt={cert}", f"--server_key={key}", "--hello-timeout", "30", "--events", "off")
    with gateway_pair(d, *args) as (prod, cons, env):
        yield Env(d, cert, prod, cons, env)


def first_uid(stdout: str) -> str:
    """The uid from 1.x's ``uid; s2cs; access_token; role`` header."""
    return stdout.splitlines()[1].split()[0]


@pytest.mark.parametrize(("inbound", "outbound", "as_json"), [
    ("inbound-request", "outbound-request", True),
    ("prod-req", "cons-req", False),
], ids=["request-json", "req-text"])
def test_two_sided_requests_print_no_key(gateways: Env, free_port: Callable[[], int], inbound: str,
                                         outbound: str, as_json: bool) -> None:
    e = gateways
    app_port = str(free_port())  # the producer application's port: never connected to here
    e.texts.clear()
    common = ["--server_cert", str(e.cert)]
    fmt = ["--json"] if as_json else []
    verbose = ["-v"] if as_json else []  # the debug log is checked too
    r = e.run(*verbose, inbound, *common, *fmt, "--s2cs", e.prod.address, "--remote_ip", "127.0.0.1",
              "--receiver_ports", app_port, "--num_conn", "1")
    if as_json:
        doc = json.loads(r.stdout)
        uid, listener = doc["uid"], doc["listeners"][0]
        assert doc["has_session_key"] is True
    else:
        uid = first_uid(r.stdout)
        listener = re.findall(r'^listeners: "([^"]+)"$', r.stdout, re.MULTILINE)[0]
    e.run(*verbose, outbound, *common, *fmt, "--s2cs", e.cons.address, "--remote_ip", "127.0.0.1",
          "--num_conn", "1", uid, listener)
    keys = e.keys()
    assert len(keys) == 1, "PROD store, CONS store and the s2uc store should hold one and the same key"
    for gw in (e.prod, e.cons):
        e.run(*verbose, "check-status", *common, *fmt, "--s2cs", gw.address, uid)
        e.run(*verbose, "list", *common, *fmt, "--s2cs", gw.address)
    e.run(*verbose, "list", "--local", *fmt)
    e.run(*verbose, "release", *common, *fmt, "--s2cs", e.prod.address, "--s2cs", e.cons.address, uid)
    assert_no_key(keys, {**e.texts, **e.logs()})


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_stream_prints_no_key(gateways: Env, free_port: Callable[[], int], as_json: bool) -> None:
    e = gateways
    e.texts.clear()
    common = ["--server_cert", str(e.cert)]
    uid = f"leak-stream-{os.getpid()}-{int(as_json)}"
    e.run(*(["-v"] if as_json else []), "stream", *common, *(["--json"] if as_json else []),
          "--prod-s2cs", e.prod.address, "--cons-s2cs", e.cons.address,
          "--producer", f"127.0.0.1:{free_port()}", "--num_conn", "2", "--uid", uid)
    keys = e.keys()
    assert keys
    e.run("release", *common, uid)
    assert_no_key(keys, {**e.texts, **e.logs()})


DEMO = [sys.executable, "-c", "from scistream.cli import main; main()", "demo"]


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_demo_prints_no_key(as_json: bool) -> None:
    """The demo with --keep, so that its stores can be read while its session is up."""
    proc = subprocess.Popen([*DEMO, "--size", str(1 << 20), "--num-conn", "2", "--security", "tls",
                             "--keep", *(["--json"] if as_json else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # With --json the progress goes to stderr; without, everything is on stdout.
        stream = proc.stderr if as_json else proc.stdout
        assert stream is not None
        seen = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "Ctrl-C" not in seen:
            line = stream.readline()
            if not line:
                break
            seen += line
        m = re.search(r"logs: (\S+)/\*\.log", seen)
        assert m, f"the demo did not keep running: {seen[-2000:]}"
        workdir = Path(m.group(1))
        keys = keys_in_s2uc_home(workdir / "s2uc")
        for db in workdir.glob("*/s2cs.db"):
            keys |= keys_in_db(db)
        logs = {f"demo log {p.relative_to(workdir)}": p.read_text(errors="replace")
                for p in [*workdir.glob("*.log"), *workdir.glob("*/*.log")]}
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out + err)[-2000:]
    if as_json:
        assert json.loads(out)["ok"]
    assert_no_key(keys, {"demo stdout": seen + out if not as_json else out,
                         "demo stderr": err + (seen if as_json else ""), **logs})
