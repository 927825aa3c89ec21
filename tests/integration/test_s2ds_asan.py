"""s2ds under AddressSanitizer: signals and control calls storm the daemon while it drains streams.

The first signal drains in a thread that sits in s2_engine_drain; the second closes the
engine from another thread while that drain, stats with connection lists and Drain
commands are still inside the engine. Before s2_engine_close waited for its callers,
this was a use after free (the drain's wait loop read the freed engine) and stats calls
could hang on a worker that had already stopped.

The extension is rebuilt with -fsanitize=address,undefined from csrc/ and the Cython
output of the normal build, into a copy of the package that PYTHONPATH puts first;
s2ds runs with libasan preloaded (CPython itself is not instrumented, so leak checks
are off: the C unit tests under tests/c check leaks).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s2ds_support import Daemon, Forward, echo_roundtrip, echo_server, need_native, stop
from streams import MiB

from scistream.dataplane import Route
from scistream.s2ds.client import S2dsClient

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "scistream" / "dataplane" / "_engine.c"  # Cython's output, left by ./dev setup
ROUNDS = 3


def _asan_runtime(cc: str) -> str | None:
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = out.stdout.strip()
    return path if out.returncode == 0 and Path(path).is_absolute() and Path(path).exists() else None


@pytest.fixture(scope="module")
def asan_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment that runs s2ds on an ASan+UBSan build of the engine extension."""
    need_native("the ASan build of the engine")
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler")
    runtime = _asan_runtime(cc)
    if runtime is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    if not GENERATED.exists():
        pytest.skip(f"{GENERATED} is missing: run ./dev setup")
    out = tmp_path_factory.mktemp("asan")
    shutil.copytree(ROOT / "scistream", out / "scistream",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    so = out / "scistream" / "dataplane" / f"_engine{sysconfig.get_config_var('EXT_SUFFIX')}"
    build = subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-g", "-std=gnu11", "-D_GNU_SOURCE",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
         f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}", "-o", str(so),
         *sorted(str(p) for p in (ROOT / "csrc").glob("*.c")), str(GENERATED),
         "-lssl", "-lcrypto", "-lpthread"],
        capture_output=True, text=True, check=False, timeout=240,
    )
    assert build.returncode == 0, f"ASan build failed:\n{build.stderr[-4000:]}"
    return {
        "PYTHONPATH": str(out),
        "LD_PRELOAD": runtime,
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "SAN_PACKAGE": str(out),
    }


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="s2ds-asan-"))  # short: an ipc:// path must fit in sun_path
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _storm(address: str, stop: threading.Event, calls: list[int]) -> None:
    """Stats with connection lists and short Drain commands, four at a time, until stop."""

    async def one(kind: int) -> None:
        async with S2dsClient(address, timeout=2.0) as c:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # refused or unanswered once the engine closes
                    if kind:
                        await c.stats(connections=True)
                    else:
                        await c.drain(0.02)
                calls[0] += 1

    async def main() -> None:
        await asyncio.gather(*(one(k) for k in (0, 1, 1, 1)))

    asyncio.run(main())


@pytest.mark.timeout(240)
def test_signal_storm_while_draining_under_asan(
    asan_env: dict[str, str], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in asan_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(state_dir)  # `python -m` puts the cwd first on sys.path, before PYTHONPATH
    with echo_server() as echo:
        for rnd in range(ROUNDS):
            run_dir = state_dir / str(rnd)
            run_dir.mkdir()
            daemon = Daemon(run_dir, "--engine", "native")
            stop = threading.Event()
            storm: threading.Thread | None = None
            streams: list[threading.Thread] = []
            try:
                daemon.wait_ready(timeout=60)
                maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
                assert asan_env["SAN_PACKAGE"] in maps, "s2ds did not load the ASan build of the engine"

                bounds = asyncio.run(_add_routes(daemon.address, echo.address))
                first = threading.Event()
                for bound in bounds:  # ~1 MiB over ~1 s each: in flight through both signals
                    t = threading.Thread(target=_quiet_roundtrip, args=(bound, first), daemon=True)
                    t.start()
                    streams.append(t)
                assert first.wait(20)
                calls = [0]
                storm = threading.Thread(target=_storm, args=(daemon.address, stop, calls), daemon=True)
                storm.start()
                time.sleep(0.2)
                daemon.proc.send_signal(signal.SIGTERM)  # drain: a thread waits in s2_engine_drain
                time.sleep(0.1 + 0.1 * rnd)
                daemon.proc.send_signal(signal.SIGTERM)  # close, under the drain and the storm
                for _ in range(3):
                    daemon.proc.send_signal(signal.SIGINT)  # and more: ignored once closing
                code = daemon.proc.wait(30)
                log = daemon.log()
                if "AddressSanitizer" in log or "runtime error" in log:
                    pytest.fail(f"round {rnd}: sanitizer report\n{log[-8000:]}", pytrace=False)
                # The forced exit carries the signal that forced it: Python runs pending handlers
                # in signal-number order, so the SIGINTs may be handled before that SIGTERM.
                assert code in (128 + signal.SIGTERM, 128 + signal.SIGINT), (
                    f"round {rnd}: exit {code}\n{log[-3000:]}"
                )
                assert calls[0] > 0
            finally:
                stop.set()
                daemon.stop()
                if storm is not None:
                    storm.join(10)
                for t in streams:
                    t.join(10)


@pytest.mark.timeout(120)
def test_forward_second_signal_under_a_drain_under_asan(
    asan_env: dict[str, str], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`s2ds forward` has the same two threads: the first signal's drain thread and the
    main thread that closes on the second signal (and prints --stats meanwhile)."""
    for name, value in asan_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(state_dir)
    with echo_server() as echo:
        for rnd in range(ROUNDS):
            fwd = Forward("--listen", "127.0.0.1:0", "--to", echo.address, "--engine", "native",
                          "--stats", "--stats-interval", "0.02")
            first = threading.Event()
            stream = threading.Thread(target=_quiet_roundtrip, args=(fwd.bound, first), daemon=True)
            try:
                maps = Path(f"/proc/{fwd.proc.pid}/maps").read_text()
                assert asan_env["SAN_PACKAGE"] in maps, "s2ds did not load the ASan build of the engine"
                stream.start()
                assert first.wait(20)
                fwd.proc.send_signal(signal.SIGTERM)
                time.sleep(0.1 + 0.1 * rnd)
                code = fwd.finish(signal.SIGTERM, timeout=30)
                if "AddressSanitizer" in fwd.stderr or "runtime error" in fwd.stderr:
                    pytest.fail(f"round {rnd}: sanitizer report\n{fwd.stderr[-8000:]}", pytrace=False)
                assert code == 128 + signal.SIGTERM, f"round {rnd}: exit {code}\n{fwd.stderr[-3000:]}"
            finally:
                stop(fwd.proc)
                stream.join(10)


async def _add_routes(address: str, target: str) -> list[str]:
    async with S2dsClient(address) as c:
        return [(await c.add_route(Route(f"r{i}", targets=(target,)))).bound for i in range(3)]


def _quiet_roundtrip(bound: str, first: threading.Event) -> None:
    """A paced echo stream that the forced close is expected to cut."""
    with contextlib.suppress(Exception):
        echo_roundtrip(bound, MiB, chunk=32 << 10, pace=0.03, on_first_echo=first.set, timeout=20)
