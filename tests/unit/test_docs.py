"""The user documentation says what the code does.

* Every ``s2cs`` / ``s2uc`` / ``appctrl`` / ``s2ds`` / ``scistream`` command line in
  a README code block names real subcommands and real options: the command path
  is resolved through the CLIs' own click objects, and each option must be one
  of the command's parameters and appear in its ``--help`` text.
* docs/TUNING.md has one table row per field of ``scistream.dataplane.Tuning``,
  with the real ``s2ds`` option and the real default; the README's short table
  names every field too.
* Relative links and in-page anchors of README.md and docs/*.md resolve.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import click
import pytest

from scistream.dataplane import Tuning

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TUNING_DOC = ROOT / "docs" / "TUNING.md"

#: Console script -> (module, attribute holding its click command).
TOOLS: dict[str, tuple[str, str]] = {
    "s2cs": ("scistream.s2cs.cli", "main"),
    "s2uc": ("scistream.s2uc.cli", "main"),
    "appctrl": ("scistream.appctrl.cli", "main"),
    "s2ds": ("scistream.s2ds.cli", "cli"),  # s2ds's `main` wraps the group for one-line errors
    "scistream": ("scistream.cli", "main"),
}
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {";", "&&", "||", "|", "&"}
WRAPPERS = {"sudo", "env", "exec", "nohup", "time"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Shown:
    """One command line shown in a code block: where, and its words."""

    line: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.line}: {' '.join(self.argv)}"


def root_command(tool: str) -> click.Command:
    module, attr = TOOLS[tool]
    cmd = getattr(importlib.import_module(module), attr)
    assert isinstance(cmd, click.Command), f"{module}.{attr} is not a click command"
    return cmd


def code_blocks(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """(language, [(line number, line)]) of every fenced code block."""
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    current: list[tuple[int, str]] | None = None
    lang = ""
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if current is None and m:
            lang, current = m.group(1).lower(), []
        elif current is not None and line.strip() == "```":
            blocks.append((lang, current))
            current = None
        elif current is not None:
            current.append((n, line))
    assert current is None, "a code block is never closed"
    return blocks


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash continuations; keep the first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in lines:
        start, text = pending if pending is not None else (n, "")
        text += line
        if line.rstrip().endswith("\\"):
            pending = (start, text.rstrip()[:-1] + " ")
        else:
            out.append((start, text))
            pending = None
    if pending is not None:
        out.append(pending)
    return out


def split_commands(words: list[str]) -> list[list[str]]:
    """Split a line's words at ; && || | & and ( ), then drop VAR=value and wrappers."""
    segments: list[list[str]] = [[]]
    for raw in words:
        if raw in SEPARATORS:
            segments.append([])
            continue
        word = raw.lstrip("(").rstrip(";)")
        if raw.startswith("("):
            segments.append([])
        if word:
            segments[-1].append(word)
        if raw.endswith((";", ")")):
            segments.append([])
    commands = []
    for seg in segments:
        start = 0
        while start < len(seg) and (ASSIGNMENT.match(seg[start]) or seg[start] in WRAPPERS):
            start += 1
        if seg[start:]:
            commands.append(seg[start:])
    return commands


def shown_commands(text: str) -> list[Shown]:
    """Every tool command line in the shell code blocks of ``text``."""
    found: list[Shown] = []
    for lang, lines in code_blocks(text):
        if lang not in SHELL_LANGUAGES:
            continue
        for n, line in logical_lines(lines):
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                pytest.fail(f"README.md:{n}: cannot split {line!r}: {exc}")
            for argv in split_commands(words):
                if argv[0] in TOOLS:
                    found.append(Shown(n, tuple(argv)))
    return found


def find_option(cmd: click.Command, name: str) -> click.Option | None:
    for param in cmd.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def takes_value(opt: click.Option) -> bool:
    return not opt.is_flag and not opt.count


def mentions(help_text: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", help_text) is not None


def check(argv: tuple[str, ...] | list[str]) -> list[str]:
    """Problems with one command line: unknown subcommands or options, options missing from --help."""
    problems: list[str] = []
    cmd = root_command(argv[0])
    ctx = click.Context(cmd, info_name=argv[0], terminal_width=200)
    path = [argv[0]]
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--":  # the rest is another program's command line (appctrl run -- ...)
            rest = list(argv[i + 1 :])
            if rest and rest[0] in TOOLS:
                problems += check(rest)
            break
        if word.startswith("-") and word != "-":
            name, has_value = word.split("=", 1)[0], "=" in word
            opt = find_option(cmd, name)
            where = " ".join(path)
            if opt is None or opt.hidden:
                problems.append(f"`{where}` has no option {name}")
            else:
                if not mentions(cmd.get_help(ctx), name):
                    problems.append(f"`{where} --help` does not show {name}")
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if not has_value and takes_value(opt) and nxt is not None and not nxt.startswith("-"):
                    i += 1  # the option's value
        elif isinstance(cmd, click.Group):
            sub = cmd.get_command(ctx, word)
            if sub is None:
                problems.append(f"`{' '.join(path)}` has no subcommand {word}")
                break
            cmd = sub
            ctx = click.Context(sub, info_name=word, parent=ctx, terminal_width=200)
            path.append(word)
        i += 1
    else:
        if isinstance(cmd, click.Group):
            problems.append(f"`{' '.join(path)}` needs a subcommand")
    return problems


# ---------------------------------------------------------------------------- README commands


def test_tools_are_the_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(TOOLS)


def test_checker_catches_wrong_commands() -> None:
    assert check(["s2uc", "stream", "--prod-s2cs", "a:1", "--num_conn", "2"]) == []
    assert check(["s2ds", "ctl", "--control", "ipc:///x", "stats"]) == []
    assert check(["appctrl", "run", "--uid", "u", "--", "appctrl", "subscribe", "{listener}"]) == []
    assert check(["s2uc", "inbound_request", "--remote_ip", "1.2.3.4"]) == []  # 1.x spelling
    assert check(["s2uc", "stream", "--no-such-option"]) == ["`s2uc stream` has no option --no-such-option"]
    assert check(["s2uc", "no-such-command"]) == ["`s2uc` has no subcommand no-such-command"]
    assert check(["s2ds", "ctl"]) == ["`s2ds ctl` needs a subcommand"]
    assert check(["appctrl", "run", "--", "s2uc", "list", "--bogus"]) == ["`s2uc list` has no option --bogus"]
    assert check(["scistream", "demo", "--corrupt-at", "1"])  # hidden: not for users


def test_command_parsing_of_code_blocks() -> None:
    text = "\n".join(
        [
            "```bash",
            "X=1 s2uc release u --s2cs a:1 \\",
            "    --s2cs b:2 # both sides",
            "(umask 077; echo x > f) && s2ds forward --listen a:1 --to b:2 &",
            "```",
            "```text",
            "s2uc not-a-command-in-output",
            "```",
        ]
    )
    found = [(s.line, s.argv) for s in shown_commands(text)]
    assert found == [
        (2, ("s2uc", "release", "u", "--s2cs", "a:1", "--s2cs", "b:2")),
        (4, ("s2ds", "forward", "--listen", "a:1", "--to", "b:2")),
    ]


def test_every_command_and_option_in_the_readme_exists() -> None:
    shown = shown_commands(README.read_text())
    # The tour shows every tool; a parser that finds nothing must not pass.
    assert {s.argv[0] for s in shown} == set(TOOLS)
    assert len(shown) >= 30
    problems = [f"{s}\n    -> {p}" for s in shown for p in check(s.argv)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- tuning knobs


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first table under ``heading``, keyed by the first cell's `name`."""
    section = text.split(heading, 1)[1]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("## "):
            break
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[name] = cells
    return rows


def default_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def s2ds_option(field_name: str) -> click.Option:
    serve = root_command("s2ds")
    assert isinstance(serve, click.Group)
    cmd = serve.commands["serve"]
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name == field_name:
            return p
    raise AssertionError(f"s2ds serve has no option for Tuning.{field_name}")


def test_tuning_doc_has_one_true_row_per_knob() -> None:
    rows = table_rows(TUNING_DOC.read_text(), "## The knobs")
    names = [f.name for f in fields(Tuning)]
    assert sorted(rows) == sorted(names), "docs/TUNING.md's table and Tuning's fields differ"
    for f in fields(Tuning):
        _name, option_cell, default_cell, what, when = rows[f.name][:5]
        opt = s2ds_option(f.name)
        for decl in (*opt.opts, *opt.secondary_opts):
            assert decl in option_cell, f"{f.name}: the s2ds option is {decl}, the doc says {option_cell}"
        assert default_text(f.default) in default_cell, f"{f.name}: default {f.default!r} vs {default_cell}"
        assert what and when, f"{f.name}: empty description"


def test_readme_tuning_table_names_every_knob() -> None:
    rows = table_rows(README.read_text(), "## Tuning knobs")
    assert sorted(rows) == sorted(f.name for f in fields(Tuning))
    for f in fields(Tuning):
        opt = s2ds_option(f.name)
        assert opt.opts[0] in rows[f.name][1], f.name


# ---------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str) -> set[str]:
    inside = False
    found = set()
    for line in text.splitlines():
        if FENCE.match(line) or (inside and line.strip() == "```"):
            inside = not inside
            continue
        if not inside and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_links_resolve(doc: Path) -> None:
    text = doc.read_text()
    anchors = headings(text)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        if path:
            if not (doc.parent / path).exists():
                bad.append(target)
        elif anchor not in anchors:
            bad.append(target)
    assert not bad, f"{doc.name}: broken links {bad}"
