"""Build the engine's C unit tests with ASan+UBSan (tests/c/Makefile) and run them.

LeakSanitizer works in this environment, so leaks fail the run too; the debug
resource counters (fds, pipes, SSL objects, connections back to zero) are
checked by the C program itself after every test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scistream.certs import make_gateway_cert

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                    reason="needs make and a C compiler")
@pytest.mark.timeout(180)
def test_engine_under_sanitizers(tmp_path: Path) -> None:
    build = subprocess.run(["make", "-s", "-C", str(HERE), f"OUT={tmp_path}"],
                           check=False, capture_output=True, text=True, timeout=150)
    assert build.returncode == 0, f"build failed:\n{build.stdout}\n{build.stderr}"
    # Gateway certificates for the mutual-TLS test, and one of another CA.
    certs, other = tmp_path / "certs", tmp_path / "other"
    for name in ("prod", "cons"):
        make_gateway_cert(certs, name, ["127.0.0.1"], days=1)
    rogue = make_gateway_cert(other, "cons", ["127.0.0.1"], days=1)
    shutil.copy(rogue.cert, certs / "rogue.crt")
    shutil.copy(rogue.key, certs / "rogue.key")
    env = dict(os.environ,
               ASAN_OPTIONS="detect_leaks=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               S2_TEST_CERT_DIR=str(certs))
    run = subprocess.run([str(tmp_path / "test_engine")], check=False, capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, f"C engine tests failed (rc {run.returncode}):\n{run.stderr[-6000:]}"
    assert "PASSED: 0 failure(s)" in run.stderr
    assert "ok   tls_mutual_cert" in run.stderr
