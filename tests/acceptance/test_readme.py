"""The README as a new user follows it, in a fresh clone, under ``env -i``, as root.

Commands are parsed out of README.md (never retyped here), so a README that says something
the product does not do fails this test. The only liberties taken are those a user takes
while typing: reading uids and addresses off the screen (the README's example outputs say
where), and ending with Ctrl-C what the README says runs until Ctrl-C.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

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


@pytest.mark.timeout(600)
def test_readme_tour_every_block_in_order(user_clone: Clone, sandbox: Callable[[], Sandbox]) -> None:
    """Every shell block of "A 5-minute tour", in order, in one shell, after
    `. .venv/bin/activate` in the clone's root, as the tour's first paragraph says
    (issue 10, items 1 and 12 and the acceptance section)."""
    box = sandbox()
    box.ok(f"cd {shlex.quote(str(user_clone.root))} && . .venv/bin/activate",
           "activate the venv as the tour says")
    mapping: dict[str, str] = {}  # README example value -> the value this run printed
    last_outputs: list[Result] = []
    last_uid: str | None = None
    for lang, text, line in _tour_blocks(user_clone):
        if lang == "text":
            printed = "\n".join(r.out for r in last_outputs)
            mapping.update(example_tokens(text, printed))
            continue
        if lang not in ("bash", "sh", "shell"):
            continue
        last_outputs = []
        for typed in commands(text):
            cmd = substitute(typed, mapping)
            if "<uid>" in cmd:  # "<uid> as printed above": the uid this user was just given
                assert last_uid, f"README.md line {line}: `{typed}` needs a uid and none was printed"
                cmd = cmd.replace("<uid>", last_uid)
            interrupted = "--watch" in shlex.split(cmd)
            if interrupted:  # "Watch both sides live (Ctrl-C ends)"
                cmd = f"timeout -s INT {CTRL_C_AFTER_S} {cmd}"
            r = box.run(cmd, timeout=240)
            last_outputs.append(r)
            ok = r.rc == 0 or (interrupted and r.rc in (124, 130))
            if not ok:
                raise ScenarioFailed(
                    f"README.md tour, block at line {line}: `{typed}`"
                    + (f" (typed as `{cmd}`)" if cmd != typed else "")
                    + f" exited {r.rc}:\n{r.out[-3000:]}\n{box.log_tail()}"
                )
            if "Traceback" in r.out:
                raise ScenarioFailed(f"README.md line {line}: `{typed}` printed a traceback:\n{r.out[-3000:]}")
            uids = re.findall(UUID_RE, r.out)
            if uids:
                last_uid = uids[-1]
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
    example = 'uid; s2cs\n21e96708-e732-11f1-9e2c-02fc00000001 127.0.0.1:5000 INVALID_TOKEN PROD\nlisteners: "127.0.0.1:5100"'
    actual = ('uid; s2cs\n0c8b3a54-0000-11f1-9e2c-02fc00000001 127.0.0.1:5000 INVALID_TOKEN PROD\n'
              'listeners: "127.0.0.1:5104"\n')
    m = example_tokens(example, actual)
    assert m == {"21e96708-e732-11f1-9e2c-02fc00000001": "0c8b3a54-0000-11f1-9e2c-02fc00000001",
                 "127.0.0.1:5000": "127.0.0.1:5000", "127.0.0.1:5100": "127.0.0.1:5104"}
    assert substitute("curl 127.0.0.1:5100 127.0.0.1:51000", m) == "curl 127.0.0.1:5104 127.0.0.1:51000"
    assert strip_comment("./dev demo    # installs what it needs, then ...") == "./dev demo"
    assert commands("a \\\n  b\n# c\n\nd # e\n") == ["a   b", "d # e"]
