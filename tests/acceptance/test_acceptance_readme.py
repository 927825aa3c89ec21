"""The README as a new user follows it, in a fresh clone, under ``env -i``, as root.

Commands are parsed out of README.md (never retyped here), so a README that says something
the product does not do fails this test. A block is run as if pasted into a terminal: its
commands follow each other with no pause, so a block that starts a server in the background
and uses it on the next line must itself wait until it serves (issue 10, item 12). The only
liberties taken are those a user takes while typing: reading uids and addresses off the
screen (the README's example outputs say where, and ``<uid>`` means the one just printed),
running in a terminal of its own a command the README says waits for a hello, and ending
with Ctrl-C what the README says runs until Ctrl-C.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from acceptance_sandbox import (
    UUID_RE,
    Clone,
    Result,
    Sandbox,
    ScenarioFailed,
    commands,
    example_tokens,
    fenced_blocks,
    section,
    strip_comment,
    substitute,
)

TOUR_HEADING = "A 5-minute tour"
# A command the README says runs until Ctrl-C gets SIGINT after this long.
CTRL_C_AFTER_S = 4


def readme(clone: Clone) -> str:
    return (clone.root / "README.md").read_text()


def demo_command(clone: Clone) -> str:
    """The line of the README's first shell block that runs the demo, without its comment."""
    first = next(b for b in fenced_blocks(readme(clone)) if b.lang in ("bash", "sh", "shell"))
    lines = [c for c in commands(first.text) if re.search(r"\bdemo\b", c)]
    assert len(lines) == 1, f"README.md's first shell block should run the demo once: {first.text!r}"
    return strip_comment(lines[0])


@pytest.mark.timeout(420)
def test_readme_demo_verbatim(user_clone: Clone, sandbox: Callable[[], Sandbox]) -> None:
    """`./dev demo` exactly as the README prints it, from the clone's root (issue 10, item 1)."""
    cmd = demo_command(user_clone)
    box = sandbox()
    box.ok(f"cd {shlex.quote(str(user_clone.root))}", "enter the clone")
    r = box.run(cmd, timeout=300)
    out = r.out
    assert r.rc == 0, f"`{cmd}` (README.md, first block) exited {r.rc}:\n{out[-4000:]}"
    assert re.search(r"SHA-256 verified\W+yes", out), f"`{cmd}` did not report verified bytes:\n{out[-4000:]}"
    assert not re.search(r"Traceback", out), out[-4000:]


def _tour_blocks(clone: Clone) -> list[tuple[str, str, int]]:
    blocks = fenced_blocks(section(readme(clone), TOUR_HEADING))
    assert any(b.lang == "bash" for b in blocks), "the tour has no shell block"
    return [(b.lang, b.text, b.line) for b in blocks]


# The 1.x verbs that wait for an application controller's hello: the README runs them "in one
# terminal" and the hello "in a second terminal", so the runner leaves them running in a
# terminal of their own and collects their exit status at the end of the next block.
WAITS_FOR_HELLO = re.compile(r"^s2uc\s+(prod-req|cons-req)\b")
# A command line that already puts something in the background (`cmd & PID=$!`): typed as is.
BACKGROUND = re.compile(r"(?<![&>|])&(?![&>])")


@dataclass
class Terminal:
    typed: str
    line: int
    pid: str
    result: Result
    blocks_left: int = 1


class TourRunner:
    """Types the tour's commands into one shell as a user reading the README would."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.patterns: list[tuple[str, str]] = []  # (example output, README value) a user re-reads
        self.mapping: dict[str, str] = {}  # README value -> the value this run printed there
        self.block_outputs: list[Result] = []
        self.last_uid: str | None = None
        self.terminals: list[Terminal] = []

    def read_example(self, example: str) -> None:
        """A README example output: remember where its values are, map them to this run's."""
        self.patterns.append((example, ""))
        printed = "\n".join(r.out for r in self.block_outputs)
        self.mapping.update(example_tokens(example, printed))

    def saw(self, r: Result) -> None:
        """The user read ``r``'s output: the newest uid, and the newest value printed at each
        place an example output showed one, are what they type next."""
        out = r.out
        uids = re.findall(UUID_RE, out)
        if uids:
            self.last_uid = uids[-1]
        for example, _ in self.patterns:
            self.mapping.update(example_tokens(example, out, keep_first=False))

    def type(self, typed: str, line: int) -> None:
        cmd = substitute(typed, self.mapping)
        if "<uid>" in cmd:  # "<uid> as printed above": the uid this user was just given
            if not self.last_uid:
                raise ScenarioFailed(f"README.md line {line}: `{typed}` needs a uid and none was printed")
            cmd = cmd.replace("<uid>", self.last_uid)
        shown = f"`{typed}`" + (f" (typed as `{cmd}`)" if cmd != typed else "")
        if WAITS_FOR_HELLO.search(cmd) and not BACKGROUND.search(cmd):
            r = self.box.run(f"{cmd} &")
            pid = self.box.ok("echo $!", "note the terminal's job").out.strip()
            self.terminals.append(Terminal(shown, line, pid, r))
            return
        interrupted = re.search(r"(^|\s)--watch(\s|$)", cmd) is not None
        if interrupted:  # "Watch both sides live (Ctrl-C ends)"
            cmd = f"timeout -s INT {CTRL_C_AFTER_S} {cmd}"
        r = self.box.run(cmd, timeout=150)
        self.block_outputs.append(r)
        if not (r.rc == 0 or (interrupted and r.rc in (124, 130))):
            raise ScenarioFailed(
                f"README.md tour, block at line {line}: {shown} exited {r.rc}:\n"
                f"{r.out[-3000:]}\n{self.box.log_tail()}"
            )
        if "Traceback" in r.out:
            raise ScenarioFailed(f"README.md line {line}: {shown} printed a traceback:\n{r.out[-3000:]}")
        self.saw(r)

    def end_block(self) -> None:
        """The other terminals' commands started before this block must be done by now."""
        for t in list(self.terminals):
            if t.blocks_left > 0:
                t.blocks_left -= 1
                continue
            self.terminals.remove(t)
            w = self.box.run(f"wait {t.pid}", timeout=60)
            out = t.result.out
            if w.rc != 0:
                raise ScenarioFailed(
                    f"README.md tour, block at line {t.line}: {t.typed} (in its own "
                    f"terminal) exited {w.rc}:\n{out[-3000:]}\n{self.box.log_tail()}"
                )
            self.block_outputs.append(t.result)
            self.saw(t.result)


@pytest.mark.timeout(600)
def test_readme_tour_every_block_in_order(user_clone: Clone, sandbox: Callable[[], Sandbox]) -> None:
    """Every shell block of "A 5-minute tour", in order, in one shell, after
    `. .venv/bin/activate` in the clone's root, as the tour's first paragraph says
    (issue 10, items 1 and 12 and the acceptance section)."""
    box = sandbox()
    box.ok(
        f"cd {shlex.quote(str(user_clone.root))} && . .venv/bin/activate",
        "activate the venv as the tour says",
    )
    tour = TourRunner(box)
    for lang, text, line in _tour_blocks(user_clone):
        if lang == "text":
            tour.read_example(text)
        elif lang in ("bash", "sh", "shell"):
            tour.block_outputs = []
            for typed in commands(text):
                tour.type(typed, line)
            tour.end_block()
    tour.end_block()
    tour.end_block()
    # The tour leaves its gateways running; the scenario's end stops them (PID namespace).


def test_tour_parsing_finds_commands(user_clone: Clone) -> None:
    """The parser itself: the tour has the blocks the runner relies on (a README that loses
    its shell blocks must not make the tour test pass vacuously)."""
    blocks = _tour_blocks(user_clone)
    cmds = [c for lang, text, _ in blocks if lang == "bash" for c in commands(text)]
    assert sum("s2cs " in c for c in cmds) >= 2, cmds
    assert any(c.startswith("s2uc ") for c in cmds), cmds
    assert all(not c.endswith("\\") for c in cmds), cmds


def test_example_tokens_maps_what_the_user_reads() -> None:
    example = (
        "uid; s2cs\n21e96708-e732-11f1-9e2c-02fc00000001 127.0.0.1:5000 INVALID_TOKEN PROD\n"
        'listeners: "127.0.0.1:5100"'
    )
    actual = (
        "uid; s2cs\n0c8b3a54-0000-11f1-9e2c-02fc00000001 127.0.0.1:5000 INVALID_TOKEN PROD\n"
        'listeners: "127.0.0.1:5104"\n'
    )
    m = example_tokens(example, actual)
    assert m == {
        "21e96708-e732-11f1-9e2c-02fc00000001": "0c8b3a54-0000-11f1-9e2c-02fc00000001",
        "127.0.0.1:5000": "127.0.0.1:5000",
        "127.0.0.1:5100": "127.0.0.1:5104",
    }
    assert substitute("curl 127.0.0.1:5100 127.0.0.1:51000", m) == "curl 127.0.0.1:5104 127.0.0.1:51000"
    assert strip_comment("./dev demo    # installs what it needs, then ...") == "./dev demo"
    assert commands("a \\\n  b\n# c\n\nd # e\n") == ["a    b", "d # e"]
    assert BACKGROUND.search("s2uc prod-req --json > p.json & PROD_REQ=$!")
    assert not BACKGROUND.search("s2uc prod-req --mock True 2>&1 && echo ok &>/dev/null")
