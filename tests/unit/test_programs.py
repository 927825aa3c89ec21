"""Our tools find each other next to their interpreter, whatever PATH is (issue 10 item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scistream import programs

BARE_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def test_tool_next_to_the_interpreter_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "s2uc"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert programs.tool_argv("s2uc") == [str(script)]


def test_without_a_script_the_module_runs_with_this_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert programs.tool_argv("appctrl") == [str(tmp_path / "python"), "-m", "scistream.appctrl"]
    assert programs.tool_argv("scistream") == [str(tmp_path / "python"), "-m", "scistream"]
    with pytest.raises(ValueError):
        programs.tool_argv("rm")


@pytest.mark.parametrize("tool", programs.TOOLS)
def test_every_tool_runs_as_a_module_with_no_venv_on_path(tool: str) -> None:
    module = "scistream" if tool == "scistream" else f"scistream.{tool}"
    res = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                         env={**BARE_PATH, "HOME": os.environ.get("HOME", "/root")}, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "version" in res.stdout


def test_demo_runs_with_a_bare_path(tmp_path: Path) -> None:
    """The demo started by its full path (as `./dev demo` does) with the venv off PATH:
    s2cs, s2ds, s2uc and appctrl must all be found."""
    res = subprocess.run([sys.executable, "-m", "scistream", "demo", "--size", "4M", "--num-conn", "2",
                          "--security", "plain", "--json"], capture_output=True, text=True,
                         env={**BARE_PATH, "HOME": str(tmp_path)}, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
