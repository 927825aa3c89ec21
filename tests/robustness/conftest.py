"""Fixtures of the robustness suite (RELIABILITY 17, 19, 20): attacks on running engines and
on s2cs's control port.

The engine fixtures (``engine_impl``, ``native_impl``, ``make_engine``, ``certs``, ...) are the
data-plane suite's own, loaded from tests/dataplane/conftest.py so both suites choose engines
the same way (native required under SCISTREAM_REQUIRE_NATIVE=1) and check every engine at
teardown the same way. Helpers of tests/dataplane and tests/s2cs are importable from here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).parent.parent
for _area in ("dataplane", "s2cs"):
    if str(_TESTS / _area) not in sys.path:
        sys.path.insert(0, str(_TESTS / _area))

# The data-plane suite's fixtures ``echo`` (an epoll echo server) and ``enough_fds`` (room for
# a few thousand sockets in this process).
from test_scale import echo, enough_fds  # noqa: E402, F401


def _load_dataplane_fixtures() -> Any:
    spec = importlib.util.spec_from_file_location("_dataplane_fixtures", _TESTS / "dataplane" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_dp = _load_dataplane_fixtures()
engine_impl = _dp.engine_impl
native_impl = _dp.native_impl
make_engine = _dp.make_engine
make_native_engine = _dp.make_native_engine
certs = _dp.certs
