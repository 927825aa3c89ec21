"""Acceptance suite fixtures: one fresh clone with ``./dev setup`` done, shared by every
scenario of the session, and a private host (``Sandbox``) per scenario."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest
from acceptance_sandbox import Clone, Sandbox, make_clone


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/acceptance/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def user_clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clone]:
    if os.geteuid() != 0:
        pytest.skip("the acceptance suite runs as root, as the README's user does (namespaces, mounts)")
    for tool in ("git", "unshare", "setpriv", "mount", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"the acceptance suite needs {tool}")
    base = tmp_path_factory.mktemp("acceptance")
    try:
        clone = make_clone(base)
    except Exception as exc:  # every scenario depends on it: say why once, plainly
        pytest.fail(f"a fresh clone could not be set up as the README says: {exc}")
    yield clone
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sandbox(user_clone: Clone, request: pytest.FixtureRequest) -> Iterator[Callable[[], Sandbox]]:
    """``sandbox()``: a private host for this test (several if called again), closed at teardown."""
    made: list[Sandbox] = []

    def make() -> Sandbox:
        name = f"{request.node.name}-{len(made)}".replace("[", "-").replace("]", "")
        box = Sandbox(user_clone, name)
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()
        shutil.rmtree(box.dir, ignore_errors=True)
