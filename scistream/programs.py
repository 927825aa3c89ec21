"""Where our own programs are, whatever ``$PATH`` says.

A tool that starts another of ours (the demo starting s2cs, s2ds, s2uc and
appctrl; appctrl running a demo application) must not depend on the caller's
``PATH``: ``./dev demo`` runs ``.venv/bin/scistream`` with the venv off ``PATH``.
The console scripts are installed next to the interpreter that runs us; when
they are not there (a plain ``PYTHONPATH`` checkout), every tool also runs as
``python -m scistream.<tool>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TOOLS = ("s2cs", "s2ds", "s2uc", "appctrl", "scistream")


def tool_argv(name: str) -> list[str]:
    """The command line that starts our tool ``name`` with this interpreter's install."""
    if name not in TOOLS:
        raise ValueError(f"{name!r} is not a SciStream tool")
    # Not resolved: a venv's python is a symlink, and its scripts sit beside the link.
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    module = "scistream" if name == "scistream" else f"scistream.{name}"
    return [sys.executable, "-m", module]
