"""The acceptance harness: a fresh clone, a private host per scenario, a user's shell in it.

* ``make_clone``: ``git clone`` of the checkout's HEAD into a temp dir and ``./dev setup``
  there, under ``env -i`` (PATH=/usr/sbin:/usr/bin:/sbin:/bin, a temporary HOME), as a new
  user would. Done once per test session (conftest.py) and shared by every scenario.
* ``Sandbox``: one scenario's private host (enter_sandbox.sh: own network, PID and mount
  namespaces, default state directories on throw-away overlays, an empty /tmp) with one
  long-lived user shell in it. Commands go to that shell one at a time, as a user types
  them; each command's output (and that of anything it leaves running in the background)
  goes to its own file, so a test can read it while it runs and show it when it fails.
* README parsing: fenced blocks of a section, commands of a block (continuation lines
  joined), and the example outputs a user reads uids and addresses from.
"""

from __future__ import annotations

import contextlib
import queue
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENTER = HERE / "enter_sandbox.sh"
TOOLS = HERE / "sandbox_tools.py"
USER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ENDPOINT_RE = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}"


def user_env(home: Path) -> dict[str, str]:
    """What ``env -i PATH=... HOME=...`` leaves a process."""
    return {"PATH": USER_PATH, "HOME": str(home)}


@dataclass
class Clone:
    """A fresh clone of the checkout's HEAD with ``./dev setup`` done in it."""

    root: Path  # the clone
    base: Path  # the acceptance work dir holding the clone and every scenario dir
    source: Path  # the checkout the tests run from
    setup_seconds: float

    @property
    def shared(self) -> Path:
        """The checkout's ../shared (the seeds); a clone in a temp dir has none beside it."""
        return self.source.parent / "shared"


def _run(
    cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def make_clone(base: Path, setup_timeout: float = 900) -> Clone:
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=HERE)
    if top.returncode != 0:
        raise RuntimeError(f"not in a git checkout: {top.stderr.strip()}")
    source = Path(top.stdout.strip())
    root = base / "scistream"
    # HEAD as committed, also when it is detached (CI) or a worktree's branch: fetch it
    # explicitly instead of trusting what `git clone` checks out.
    for cmd in (
        ["git", "clone", "-q", "--no-checkout", str(source), str(root)],
        ["git", "-C", str(root), "fetch", "-q", str(source), "HEAD"],
        ["git", "-C", str(root), "checkout", "-q", "--detach", "FETCH_HEAD"],
    ):
        r = _run(cmd)
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {r.stderr.strip()}")
    home = base / "home-setup"
    home.mkdir()
    t0 = time.monotonic()
    r = _run(["./dev", "setup"], cwd=root, env=user_env(home), timeout=setup_timeout)
    if r.returncode != 0:
        raise RuntimeError(
            f"./dev setup in a fresh clone failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}"
        )
    return Clone(root=root, base=base, source=source, setup_seconds=time.monotonic() - t0)


@dataclass
class Result:
    cmd: str
    rc: int
    path: Path  # the output file (still growing if the command left something running)

    @property
    def out(self) -> str:
        return self.path.read_text(errors="replace")


class ScenarioFailed(AssertionError):
    pass


@dataclass
class Sandbox:
    """One scenario's private host and a user's shell in it (see enter_sandbox.sh)."""

    clone: Clone
    name: str
    dir: Path = field(init=False)
    home: Path = field(init=False)
    transcript: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = self.clone.base / f"scenario-{self.name}"
        self.dir.mkdir()
        self.home = self.dir / "home"
        self.outdir = self.dir / "out"
        self.outdir.mkdir()
        self.tools = self.dir / "sandbox_tools.py"  # stdlib only: runs with the system python3
        self.tools.write_bytes(TOOLS.read_bytes())
        self._n = 0
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            # setpriv --pdeathsig: the sandbox dies with this test process, whatever kills it.
            [
                "setpriv",
                "--pdeathsig",
                "KILL",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--net",
                "--",
                "/bin/bash",
                str(ENTER),
                str(self.dir),
                str(self.clone.base),
                str(self.home),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    # ------------------------------------------------------------------ commands
    def run(self, cmd: str, *, timeout: float = 60, stdin: str | None = None) -> Result:
        """Type ``cmd`` into the shell; wait (at most ``timeout`` s) for its prompt to return."""
        self._n += 1
        n = self._n
        out = self.outdir / f"{n:03d}.txt"
        out.touch()
        src = "/dev/null"
        if stdin is not None:
            src_path = self.outdir / f"{n:03d}.stdin"
            src_path.write_text(stdin)
            src = str(src_path)
        # Braces, not a subshell: cd, variables and background jobs stay in the user's shell.
        script = f'{{ {cmd}\n}} >{shlex.quote(str(out))} 2>&1 <{shlex.quote(src)}; echo "@@done {n} $?"\n'
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(script)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ScenarioFailed(f"the scenario shell is gone before {cmd!r}:\n{self.log_tail()}") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.transcript.append(f"$ {cmd}\n[still running after {timeout:.0f} s]\n{_tail(out)}")
                raise ScenarioFailed(
                    f"`{cmd}` did not finish within {timeout:.0f} s; its output:\n"
                    f"{_tail(out)}\n{self.log_tail()}"
                )
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ScenarioFailed(
                    f"the scenario shell died during `{cmd}` (enter_sandbox.sh's own errors are the "
                    f"[shell] lines):\n{_tail(out)}\n{self.log_tail()}"
                )
            m = re.fullmatch(rf"@@done {n} (\d+)", line)
            if m:
                rc = int(m.group(1))
                break
            self.transcript.append(f"[shell] {line}")
        res = Result(cmd, rc, out)
        self.transcript.append(f"$ {cmd}\n[exit {rc}]\n{_tail(out, 1500)}")
        return res

    def ok(self, cmd: str, why: str, *, timeout: float = 60, stdin: str | None = None) -> Result:
        """Run ``cmd``; it must exit 0. ``why`` says in the failure what the step was for."""
        r = self.run(cmd, timeout=timeout, stdin=stdin)
        if r.rc != 0:
            raise ScenarioFailed(f"{why}: `{cmd}` exited {r.rc}:\n{_tail(r.path)}\n{self.log_tail()}")
        return r

    def until(
        self,
        cmd: str,
        pred: Callable[[Result], bool],
        why: str,
        *,
        timeout: float = 20,
        interval: float = 0.3,
        per_call: float = 30,
    ) -> Result:
        """Run ``cmd`` again and again until ``pred`` holds on its result, at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.run(cmd, timeout=per_call)
            if pred(r):
                return r
            if time.monotonic() > deadline:
                raise ScenarioFailed(
                    f"{why}: not within {timeout:.0f} s; last `{cmd}` exited {r.rc}:\n"
                    f"{_tail(r.path)}\n{self.log_tail()}"
                )
            time.sleep(interval)

    def py(self, args: str) -> str:
        """A command line running the sandbox's stdlib-only helper with the system python3."""
        return f"/usr/bin/python3 {shlex.quote(str(self.tools))} {args}"

    def log_tail(self, chars: int = 6000) -> str:
        text = "\n".join(self.transcript)
        return "--- scenario transcript (tail) ---\n" + text[-chars:]

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """End the shell; the PID namespace takes every process of the scenario with it."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # --kill-child: the namespace's PID 1 gets SIGKILL, and all in it
            self.proc.wait(10)
        self._reader.join(5)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


# ---------------------------------------------------------------------- README parsing
@dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence


def fenced_blocks(markdown: str) -> list[Block]:
    blocks: list[Block] = []
    lang: str | None = None
    start = 0
    body: list[str] = []
    for i, line in enumerate(markdown.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)\s*$", line)
        if lang is None and fence:
            lang, start, body = fence.group(1), i, []
        elif lang is not None and re.match(r"^\s*```\s*$", line):
            blocks.append(Block(lang, "\n".join(body), start))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def section(markdown: str, heading: str) -> str:
    """The text of the ``## heading`` section, up to the next level-2 heading."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", markdown, re.MULTILINE | re.DOTALL)
    if not m:
        raise ScenarioFailed(f"README.md has no '## {heading}' section")
    return m.group(1)


def commands(block: str) -> list[str]:
    """The commands of a shell block as a user types them: continuation lines joined, blank and
    comment-only lines dropped (comments after a command stay; the shell drops them)."""
    out: list[str] = []
    cur = ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def strip_comment(cmd: str) -> str:
    """``./dev demo    # installs ...`` -> ``./dev demo`` (shell words, so quoted # stays)."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=False)
    lex.whitespace_split = True
    lex.commenters = "#"
    return shlex.join(list(lex))


def example_tokens(example: str, actual: str, *, keep_first: bool = True) -> dict[str, str]:
    """Map the uids and host:port addresses of a README example output to the ones this run
    printed in the same place: a user reads their own values off the screen the same way.
    ``keep_first``: the first match in ``actual`` wins, else the last (the newest on screen)."""
    mapping: dict[str, str] = {}
    token = re.compile(f"({UUID_RE}|{ENDPOINT_RE})")
    for line in example.splitlines():
        parts = token.split(line.strip())
        if len(parts) < 2:
            continue
        pattern = ""
        for i, part in enumerate(parts):
            if i % 2:
                pattern += f"({UUID_RE})" if re.fullmatch(UUID_RE, part) else f"({ENDPOINT_RE})"
            else:
                pattern += r"\s+".join(re.escape(w) for w in part.split(" "))
        found = list(re.finditer(pattern, actual))
        if found:
            m = found[0] if keep_first else found[-1]
            for example_tok, actual_tok in zip(parts[1::2], m.groups(), strict=True):
                if keep_first:
                    mapping.setdefault(example_tok, actual_tok)
                else:
                    mapping[example_tok] = actual_tok
    return mapping


def substitute(cmd: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        cmd = re.sub(rf"(?<![\w.:-]){re.escape(old)}(?![\w:-]|\.\d)", new, cmd)
    return cmd


# ---------------------------------------------------------------------- steps shared by scenarios
def serving(box: Sandbox, address: str, cert: str, *, timeout: float = 30) -> None:
    """Wait (as an operator watching the log would) until the s2cs at ``address`` is SERVING."""
    box.until(
        f"scistream health --s2cs {address} --server-cert {shlex.quote(cert)}",
        lambda r: r.rc == 0 and "SERVING" in r.out and "NOT_SERVING" not in r.out,
        f"the s2cs at {address} to serve",
        timeout=timeout,
    )


def background(box: Sandbox, cmd: str) -> tuple[Result, str]:
    """Start ``cmd`` in the background of the user's shell; its output file and its PID."""
    r = box.ok(f"{cmd} &", f"start `{cmd}`")
    pid = box.ok("echo $!", "the PID of the job just started").out.strip()
    return r, pid


def finish(box: Sandbox, job: tuple[Result, str], why: str, *, timeout: float = 60) -> str:
    """Wait for a background job; it must exit 0. Its output."""
    r, pid = job
    w = box.run(f"wait {pid}", timeout=timeout)
    if w.rc != 0:
        raise ScenarioFailed(f"{why}: `{r.cmd}` exited {w.rc}:\n{_tail(r.path)}\n{box.log_tail()}")
    return r.out


def listeners_of(out: str) -> list[str]:
    """The listeners an s2uc command printed, in either of the 1.x formats."""
    found = re.findall(rf'^listeners: "({ENDPOINT_RE})"', out, re.MULTILINE)
    m = re.search(r"^Listeners: \[([^\]]*)\]", out, re.MULTILINE)
    if m:
        found += re.findall(ENDPOINT_RE, m.group(1))
    return found


def sha256_through(box: Sandbox, endpoint: str, expected: str, why: str, *, timeout: float = 20) -> None:
    """Read a whole stream from ``endpoint`` (retrying until ``timeout``): the SHA-256 must match."""
    box.until(
        box.py(f"fetch {endpoint}"),
        lambda r: r.rc == 0 and f"sha256 {expected}" in r.out,
        f"{why}: the bytes read from {endpoint} to have SHA-256 {expected}",
        timeout=timeout,
    )


def processes(box: Sandbox, pattern: str) -> list[tuple[int, str]]:
    """Live processes of the sandbox (its own PID namespace) whose command line matches."""
    r = box.ok("ps -eo pid=,stat=,args=", "list the sandbox's processes")
    found = []
    for line in r.out.splitlines():
        parts = line.split(None, 2)
        live = len(parts) == 3 and not parts[1].startswith("Z") and "ps -eo" not in parts[2]
        if live and re.search(pattern, parts[2]):
            found.append((int(parts[0]), parts[2]))
    return found
