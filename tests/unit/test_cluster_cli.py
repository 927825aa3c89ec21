"""What an operator types for a gateway of several nodes (issue 12): the s2cs options, TOML
keys and environment variables of the cluster, their one-sentence refusals, the cluster key
file (preflight) and `scistream cluster-key`."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from scistream.certs import make_gateway_cert
from scistream.cli import main as scistream_main
from scistream.s2cs import preflight
from scistream.s2cs import server as s2cs_server
from scistream.s2cs.cli import main as s2cs_main
from scistream.s2cs.clusterkey import ClusterKeyError, load_cluster_key, write_cluster_key
from scistream.s2cs.config import NODE_NAME, PLACEMENTS, ServerConfig, default_node_name

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("SCISTREAM_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SCISTREAM_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """The configs s2cs would serve with: serve() is replaced, nothing starts."""
    seen: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(s2cs_server, "serve", fake_serve)
    return seen


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    write_cluster_key(path)
    return path


def s2cs(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(s2cs_main, ["--ssl", "False", *args], env=env, catch_exceptions=False)


def refusal(r: Result) -> str:
    """The one line a refused command line gets (click's usage error: exit 2)."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- s2cs options


def test_without_etcd_the_node_is_alone(started: list[ServerConfig]) -> None:
    r = s2cs()
    assert r.exit_code == 0, r.output
    (config,) = started
    assert not config.clustered and config.etcd == []
    defaults = ServerConfig(state_dir="-")
    assert (config.node_ttl, config.etcd_prefix, config.placement) == (
        defaults.node_ttl,
        defaults.etcd_prefix,
        defaults.placement,
    )
    assert config.node_name == default_node_name()


def test_every_cluster_option_reaches_the_config(started: list[ServerConfig], key: Path) -> None:
    r = s2cs(
        "--etcd", "http://127.0.0.1:2379,http://127.0.0.1:22379",
        "--etcd", "http://[::1]:32379",
        "--node-name", "gw-a.1",
        "--etcd-key-file", str(key),
        "--node-ttl", "7.5",
        "--placement", "PACK",
        "--etcd-prefix", "/site/gw/",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (config,) = started
    assert config.clustered
    assert config.etcd == ["http://127.0.0.1:2379", "http://127.0.0.1:22379", "http://[::1]:32379"]
    assert config.node_name == "gw-a.1"
    assert config.etcd_key_file == str(key)
    assert config.node_ttl == 7.5
    assert config.placement == "pack"
    assert config.etcd_prefix == "/site/gw/"


def test_underscore_spellings_work_too(started: list[ServerConfig], key: Path) -> None:
    r = s2cs("--etcd", "http://127.0.0.1:2379", "--node_name", "b", "--etcd_key_file", str(key),
             "--node_ttl", "3", "--etcd_prefix", "/x/")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (started[0].node_name, started[0].node_ttl, started[0].etcd_prefix) == ("b", 3.0, "/x/")


def test_environment(started: list[ServerConfig], key: Path) -> None:
    env = {
        "SCISTREAM_ETCD": "http://127.0.0.1:2379,http://127.0.0.1:22379",
        "SCISTREAM_NODE_NAME": "envnode",
        "SCISTREAM_NODE_TTL": "20",
        "SCISTREAM_ETCD_KEY_FILE": str(key),
        "SCISTREAM_ETCD_PREFIX": "/env/",
        "SCISTREAM_PLACEMENT": "load",
    }
    r = s2cs(env=env)
    assert r.exit_code == 0, r.output
    (config,) = started
    assert config.etcd == ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
    assert (config.node_name, config.node_ttl, config.etcd_key_file) == ("envnode", 20.0, str(key))
    assert (config.etcd_prefix, config.placement) == ("/env/", "load")


@pytest.mark.parametrize(
    "etcd_line", ['etcd = ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]',
                  'etcd = "http://127.0.0.1:2379,http://127.0.0.1:22379"']
)  # fmt: skip
def test_toml_takes_a_list_or_a_comma_string(
    started: list[ServerConfig], key: Path, tmp_path: Path, etcd_line: str
) -> None:
    toml = tmp_path / "s2cs.toml"
    toml.write_text(
        f'[s2cs]\n{etcd_line}\nnode_name = "tomlnode"\nnode_ttl = 4\netcd_key_file = "{key}"\n'
        'etcd_prefix = "/toml/"\nplacement = "spread"\n'
    )
    r = s2cs("--config", str(toml))
    assert r.exit_code == 0, r.output
    (config,) = started
    assert config.etcd == ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
    assert (config.node_name, config.node_ttl, config.etcd_prefix) == ("tomlnode", 4.0, "/toml/")


def test_command_line_beats_environment_beats_file(
    started: list[ServerConfig], key: Path, tmp_path: Path
) -> None:
    toml = tmp_path / "s2cs.toml"
    toml.write_text(f'etcd = "http://127.0.0.1:1"\nnode_name = "file"\netcd_key_file = "{key}"\n')
    r = s2cs("--config", str(toml), "--node-name", "cli", env={"SCISTREAM_ETCD": "http://127.0.0.1:2"})
    assert r.exit_code == 0, r.output
    assert (started[0].etcd, started[0].node_name) == (["http://127.0.0.1:2"], "cli")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--etcd", "http://127.0.0.1:2379,https://127.0.0.1:2380"], "mixes http:// and https:// URLs"),
        (["--etcd", "http://127.0.0.1:2379", "--etcd-ca", "ca.pem"], "give its https://HOST:PORT URLs"),
        (["--etcd", "https://127.0.0.1:2379", "--etcd-cert", "c.pem"], "--etcd-cert and --etcd-key go"),
        (["--etcd", "https://127.0.0.1:2379", "--etcd-key", "k.pem"], "--etcd-cert and --etcd-key go"),
        (["--etcd", "127.0.0.1:2379"], "is not an etcd client URL http://HOST:PORT"),
        (["--etcd", "http://127.0.0.1"], "is not an etcd client URL http://HOST:PORT"),
        (["--etcd", "http://127.0.0.1:99999"], "is not an etcd client URL http://HOST:PORT"),
        (["--etcd", "http://127.0.0.1:2379/v3"], "is not an etcd client URL http://HOST:PORT"),
        (["--etcd", "http://127.0.0.1:2379,ftp://x:1"], "'ftp://x:1' is not an etcd client URL"),
        (["--etcd", "http://127.0.0.1:2379", "--node-name", "a/b"], "--node-name 'a/b' is not a node name"),
        (["--etcd", "http://127.0.0.1:2379", "--node-name", "x" * 64], "is not a node name: 1 to 63"),
        (["--node-ttl", "1"], "--node-ttl"),
        (["--node-ttl", "301"], "--node-ttl"),
        (["--node-ttl", "nan"], "--node-ttl"),
        (["--etcd-prefix", "scistream/v1/"], "--etcd-prefix 'scistream/v1/' must start and end with '/'"),
        (["--etcd-prefix", "/scistream/v1"], "must start and end with '/'"),
        (["--etcd-prefix", "/"], "must start and end with '/'"),
        (["--placement", "random"], "--placement"),
    ],
)
def test_refusals_are_one_sentence_and_a_usage_error(
    started: list[ServerConfig], key: Path, args: list[str], needle: str
) -> None:
    extra = ["--etcd-key-file", str(key)] if "--etcd" in args else []
    line = refusal(s2cs(*args, *extra))
    assert needle in line, line
    assert started == [], "nothing may start"


def test_etcd_without_a_key_file_is_refused(started: list[ServerConfig]) -> None:
    line = refusal(s2cs("--etcd", "http://127.0.0.1:2379"))
    assert "--etcd needs --etcd-key-file" in line and "scistream cluster-key" in line
    assert started == []


def test_help_explains_the_cluster() -> None:
    text = " ".join(CliRunner().invoke(s2cs_main, ["--help"]).output.split())
    for needle in (
        "Without --etcd this s2cs is a gateway alone, with its SQLite store",
        "membership, the sessions and their owners, port reservations and session keys",
        "every node of the facility needs the same file",
        "every node of the facility needs the same one",
        "spread",
        "pack",
        "load",
    ):
        assert needle in text, needle


def test_default_node_name_is_the_sanitised_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "gw 1+lab.example.org")
    assert default_node_name() == "gw-1-lab.example.org"
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 100)
    assert default_node_name() == "h" * 63
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert default_node_name() == "node"
    for name in ("gw-1-lab.example.org", "h" * 63, "node"):
        assert NODE_NAME.match(name)
    assert PLACEMENTS == ("spread", "pack", "load")


# ---------------------------------------------------------------- the key file


def test_cluster_key_command_writes_a_private_hex_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    r = CliRunner().invoke(scistream_main, ["cluster-key", str(path)])
    assert r.exit_code == 0, r.output
    assert "copy this same file to every s2cs node of the facility" in r.output
    text = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_cluster_key(path) == bytes.fromhex(text.strip())


def test_cluster_key_command_never_replaces_a_key_without_force(tmp_path: Path) -> None:
    path = tmp_path / "k"
    assert CliRunner().invoke(scistream_main, ["cluster-key", str(path)]).exit_code == 0
    first = path.read_bytes()
    r = CliRunner().invoke(scistream_main, ["cluster-key", str(path)])
    assert r.exit_code == 1
    assert "already exists; not replacing a cluster key" in r.output and "--force" in r.output
    assert path.read_bytes() == first
    r = CliRunner().invoke(scistream_main, ["cluster-key", "--force", str(path)])
    assert r.exit_code == 0, r.output
    assert path.read_bytes() != first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k"], "no temporary file left behind"


def test_cluster_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_cluster_key(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_load_accepts_raw_bytes_and_hex_with_or_without_newline(tmp_path: Path) -> None:
    raw = bytes(range(32))
    assert load_cluster_key(private(tmp_path / "raw", raw)) == raw
    assert load_cluster_key(private(tmp_path / "hex", raw.hex().encode())) == raw
    assert load_cluster_key(private(tmp_path / "hexnl", raw.hex().upper().encode() + b"\n")) == raw
    raw_nl = bytes(range(31)) + b"\n"  # 32 raw bytes that happen to end in a newline
    assert load_cluster_key(private(tmp_path / "rawnl", raw_nl)) == raw_nl


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "is empty"),
        (b"\x01" * 31, "holds 31 bytes that are neither 32 raw bytes nor 64 hex characters"),
        (b"\x01" * 33, "holds 33 bytes"),
        (b"ab" * 32 + b"\n\n", "holds 66 bytes"),
        (b"zz" * 32 + b"\n", "holds 65 bytes"),
        (b"ab" * 33, "holds 66 bytes"),
    ],
)
def test_load_refuses_what_is_not_a_key(tmp_path: Path, data: bytes, needle: str) -> None:
    with pytest.raises(ClusterKeyError, match=re.escape(needle)):
        load_cluster_key(private(tmp_path / "k", data))


def test_load_refuses_a_key_others_may_read(tmp_path: Path) -> None:
    path = private(tmp_path / "k", bytes(32))
    for mode in (0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(ClusterKeyError, match=r"is open to group or others \(mode -rw.*chmod 600"):
            load_cluster_key(path)


def test_load_refuses_missing_and_non_regular_files(tmp_path: Path) -> None:
    with pytest.raises(ClusterKeyError, match="does not exist; make one with `scistream cluster-key"):
        load_cluster_key(tmp_path / "nope")
    with pytest.raises(ClusterKeyError, match="is not a regular file"):
        load_cluster_key(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ClusterKeyError, match="is not a regular file"):
        load_cluster_key(fifo)  # refused, not waited on


def test_a_symlink_to_a_private_key_is_fine(tmp_path: Path) -> None:
    target = private(tmp_path / "real", bytes(range(32)))
    link = tmp_path / "link"
    link.symlink_to(target)
    assert load_cluster_key(link) == bytes(range(32))


def clustered(key_file: str) -> ServerConfig:
    return ServerConfig(
        port=0, ssl=False, state_dir="-", etcd=["http://127.0.0.1:2379"], etcd_key_file=key_file
    )


def test_preflight_checks_the_key_only_with_etcd(tmp_path: Path, key: Path) -> None:
    preflight.check(clustered(str(key)))
    preflight.check(ServerConfig(port=0, ssl=False, state_dir="-", etcd_key_file=str(tmp_path / "nope")))
    with pytest.raises(
        preflight.PreflightError, match=r"^--etcd-key-file: the cluster key .* does not exist"
    ):
        preflight.check(clustered(str(tmp_path / "nope")))
    key.chmod(0o644)
    with pytest.raises(preflight.PreflightError, match="open to group or others"):
        preflight.check(clustered(str(key)))
    with pytest.raises(preflight.PreflightError, match="--etcd needs --etcd-key-file"):
        preflight.check(clustered(""))


def test_tls_options_reach_the_config_from_every_source(
    started: list[ServerConfig], key: Path, tmp_path: Path
) -> None:
    r = s2cs("--etcd", "https://127.0.0.1:2379", "--etcd-key-file", str(key), "--etcd-ca", "/c/ca.pem",
             "--etcd-cert", "/c/n.pem", "--etcd-key", "/c/n.key")  # fmt: skip
    assert r.exit_code == 0, r.output
    (config,) = started
    assert (config.etcd_ca, config.etcd_cert, config.etcd_key) == ("/c/ca.pem", "/c/n.pem", "/c/n.key")
    env = {"SCISTREAM_ETCD": "https://127.0.0.1:2379", "SCISTREAM_ETCD_KEY_FILE": str(key),
           "SCISTREAM_ETCD_CA": "/e/ca.pem"}  # fmt: skip
    assert s2cs(env=env).exit_code == 0
    assert (started[1].etcd_ca, started[1].etcd_cert) == ("/e/ca.pem", "")
    toml = tmp_path / "s2cs.toml"
    toml.write_text(f'etcd = "https://127.0.0.1:2379"\netcd_key_file = "{key}"\netcd_ca = "/t/ca.pem"\n')
    assert s2cs("--config", str(toml)).exit_code == 0
    assert started[2].etcd_ca == "/t/ca.pem"


def test_preflight_checks_the_etcd_tls_files(tmp_path: Path, key: Path) -> None:
    ours = make_gateway_cert(tmp_path / "pki", "node", ["127.0.0.1"], ca_name="etcd-ca")
    other = make_gateway_cert(tmp_path / "other", "stranger", ["127.0.0.1"])

    def tls(ca: Path | str = "", cert: Path | str = "", key_file: Path | str = "") -> ServerConfig:
        return ServerConfig(port=0, ssl=False, state_dir="-", etcd=["https://127.0.0.1:2379"],
                            etcd_key_file=str(key), etcd_ca=str(ca), etcd_cert=str(cert),
                            etcd_key=str(key_file))  # fmt: skip

    preflight.check(tls())  # the system's roots, no client certificate
    preflight.check(tls(ours.ca_cert, ours.cert, ours.key))
    with pytest.raises(preflight.PreflightError, match=r"^cannot read the etcd CA --etcd-ca .*nope"):
        preflight.check(tls(tmp_path / "nope"))
    with pytest.raises(preflight.PreflightError, match=r"--etcd-ca .* is not a PEM file of certificates"):
        preflight.check(tls(ours.key))
    with pytest.raises(preflight.PreflightError, match=r"--etcd-cert .* is not a PEM certificate"):
        preflight.check(tls(ours.ca_cert, ours.key, ours.key))
    with pytest.raises(preflight.PreflightError, match=r"--etcd-key .* does not belong to the certificate"):
        preflight.check(tls(ours.ca_cert, ours.cert, other.key))
    with pytest.raises(preflight.PreflightError, match="cannot read the etcd client key --etcd-key"):
        preflight.check(tls(ours.ca_cert, ours.cert, tmp_path / "none.key"))


def test_s2cs_with_a_readable_key_stops_at_once_saying_why(tmp_path: Path, key: Path) -> None:
    """The real s2cs process: the key is checked before anything starts (exit 1, one line)."""
    key.chmod(0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "scistream.s2cs.cli", "--ssl", "False", "--port", "0",
         "--state-dir", str(tmp_path / "state"), "--etcd", "http://127.0.0.1:1",
         "--etcd-key-file", str(key), "--node-name", "a"],
        check=False, capture_output=True, text=True, timeout=30,
        env={**os.environ, "SCISTREAM_STATE_DIR": ""},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1] == (
        f"s2cs: --etcd-key-file: the cluster key {key} is open to group or others (mode -rw-r--r--); "
        f"it decrypts every session key in etcd: chmod 600 {key}"
    )
    assert not (tmp_path / "state" / "s2cs.db").exists(), "nothing was started"
