"""The deployment files (deploy/, Dockerfile) start an s2cs that peers can use, or say why not.

* deploy/s2cs.service takes the listener address from /etc/scistream/s2cs.env; its command
  line parses with the real s2cs CLI, and as shipped (empty SCISTREAM_LISTENER_IP) s2cs
  refuses to start instead of advertising an address no peer can reach.
* The image's entry point refuses to start without SCISTREAM_LISTENER_IP or --listener-ip,
  and otherwise runs s2cs with its arguments; the Dockerfile's default command parses.
* deploy/99-scistream-dtn.conf names real sysctls.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scistream.s2cs import cli
from scistream.s2cs.config import listener_ip_problem

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a systemd unit file (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = " ".join(shlex.split(value))
    return values


def s2cs_options(argv: list[str]) -> dict[str, Any]:
    """What the real s2cs CLI makes of ``argv`` (no server is started)."""
    ctx = cli.main.make_context("s2cs", list(argv))
    return dict(ctx.params)


def test_systemd_unit_takes_the_listener_address_from_its_environment_file() -> None:
    unit = unit_settings(DEPLOY / "s2cs.service")
    assert unit["EnvironmentFile"] == ["/etc/scistream/s2cs.env"]  # required: no leading '-'
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "s2cs"
    assert "${SCISTREAM_LISTENER_IP}" in argv and "0.0.0.0" not in argv

    def expand(value: str) -> list[str]:  # what systemd does with a whole-word ${VAR}
        return [value if a == "${SCISTREAM_LISTENER_IP}" else a for a in argv[1:]]

    opts = s2cs_options(expand("192.0.2.10"))
    assert opts["listener_ip"] == "192.0.2.10" and opts["type_"] == "native"
    assert listener_ip_problem(opts["listener_ip"]) is None
    # As shipped, the environment file leaves the address empty: s2cs refuses to start.
    shipped = env_file(DEPLOY / "s2cs.env")
    assert shipped == {"SCISTREAM_LISTENER_IP": ""}
    problem = listener_ip_problem(s2cs_options(expand(shipped["SCISTREAM_LISTENER_IP"]))["listener_ip"])
    assert problem is not None and "SCISTREAM_LISTENER_IP" in problem


def dockerfile_instruction(name: str) -> list[str]:
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, lines
    value = json.loads(lines[0][len(name) + 1 :])
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_dockerfile_runs_the_entry_point_with_a_command_s2cs_understands() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/scistream-entrypoint" in text
    assert dockerfile_instruction("ENTRYPOINT") == ["scistream-entrypoint"]
    cmd = dockerfile_instruction("CMD")
    assert not any("listener" in a for a in cmd) and "0.0.0.0" not in cmd
    opts = s2cs_options(cmd)
    assert (opts["port"], opts["server_crt"]) == (5000, "/etc/scistream/server.crt")


def entrypoint(args: list[str], listener_ip: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"  # the s2cs script
    env["SCISTREAM_STATE_DIR"] = str(tmp_path / "state")
    if listener_ip is not None:
        env["SCISTREAM_LISTENER_IP"] = listener_ip
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("listener_ip", [None, ""])
def test_entry_point_refuses_to_start_without_a_listener_address(
    listener_ip: str | None, tmp_path: Path
) -> None:
    r = entrypoint(["--port", "0", "--ssl", "False"], listener_ip, tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("s2cs: SCISTREAM_LISTENER_IP is not set: set it to the address")
    assert "-e SCISTREAM_LISTENER_IP=" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()  # s2cs never ran


def test_entry_point_hands_its_arguments_to_s2cs(tmp_path: Path) -> None:
    # The address from the environment or from an argument reaches s2cs, which refuses
    # 0.0.0.0 itself: the one-line message is s2cs's, not the entry point's.
    base = ["--port", "0", "--bind", "127.0.0.1", "--ssl", "False", "-t", "stunnel"]
    for args, env_ip in (
        (base, "0.0.0.0"),
        ([*base, "--listener-ip", "0.0.0.0"], None),
        ([*base, "--listener_ip=::"], None),
    ):
        r = entrypoint(args, env_ip, tmp_path)
        assert r.returncode == 1, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("s2cs: --listener-ip ") and "is not an address peers can connect to" in last
    r = entrypoint(["--version"], None, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("s2cs, version")


def test_sysctl_file_names_real_sysctls() -> None:
    settings = {}
    for raw in (DEPLOY / "99-scistream-dtn.conf").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, sep, value = line.partition("=")
            assert sep and value.strip(), line
            settings[key.strip()] = value.strip()
    # s2ds runs unprivileged: its pipes would shrink below --pipe-size past the per-user cap.
    assert settings["fs.pipe-user-pages-soft"] == "0"
    assert int(settings["fs.pipe-max-size"]) >= 1 << 20  # s2ds's default --pipe-size
    if not Path("/proc/sys/net/core/rmem_max").exists():
        pytest.skip("no /proc/sys here")
    missing = [k for k in settings if not Path("/proc/sys", *k.split(".")).exists()]
    assert missing == [], f"not sysctls of this kernel: {missing}"
