"""The s2cs state directory: one owner at a time, an instance id that lasts, and a store that
is never silently replaced by an empty one (scistream/s2cs/store.py, config.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scistream.s2cs.config import ServerConfig, default_state_dir
from scistream.s2cs.store import StateDirLock, StateError, load_instance, open_store


def test_default_state_dir_is_per_control_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SCISTREAM_STATE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    base = "/var/lib/scistream" if os.geteuid() == 0 else str(tmp_path / ".scistream")
    assert ServerConfig(port=5000).state_dir == f"{base}/5000"
    assert ServerConfig(port=6000).state_dir == f"{base}/6000"
    assert ServerConfig(port=5000, state_dir="/x").state_dir == "/x"  # --state-dir wins
    monkeypatch.setenv("SCISTREAM_STATE_DIR", str(tmp_path / "env"))
    assert ServerConfig(port=5000).state_dir == default_state_dir(6000) == str(tmp_path / "env")


def test_lock_names_the_holder_and_is_released(tmp_path: Path) -> None:
    first = StateDirLock(str(tmp_path))
    first.acquire()
    assert (tmp_path / "s2cs.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(StateError, match=rf"in use by another s2cs \(pid {os.getpid()}\)"):
        StateDirLock(str(tmp_path)).acquire()
    first.release()
    again = StateDirLock(str(tmp_path))
    again.acquire()  # a released (or dead holder's) lock never blocks
    again.release()


def test_first_start_creates_store_and_marker_and_the_id_lasts(tmp_path: Path) -> None:
    inst = load_instance(str(tmp_path))
    assert not inst.store_existed and not (tmp_path / "s2cs.instance").exists()
    open_store(str(tmp_path), inst).close()
    again = load_instance(str(tmp_path))
    assert again.store_existed and again.instance_id == inst.instance_id
    open_store(str(tmp_path), again).close()  # a good store opens


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda db: db.unlink(), "is missing"),
        (lambda db: os.truncate(db, 0), "is empty (0 bytes)"),
        (lambda db: db.write_bytes(b"not a database" * 300), "is not a readable session store"),
    ],
    ids=["missing", "empty", "garbage"],
)
def test_a_lost_store_is_refused_unless_fresh(tmp_path: Path, damage: object, words: str) -> None:
    open_store(str(tmp_path), load_instance(str(tmp_path))).close()
    db = tmp_path / "s2cs.db"
    damage(db)  # type: ignore[operator]
    with pytest.raises(StateError, match="--fresh-state") as info:
        open_store(str(tmp_path), load_instance(str(tmp_path)))
    assert words in str(info.value)
    store = open_store(str(tmp_path), load_instance(str(tmp_path)), fresh=True)
    assert store.load() == []
    store.close()
    open_store(str(tmp_path), load_instance(str(tmp_path))).close()  # and it is trusted from now on


def test_an_empty_store_is_refused_even_without_a_marker(tmp_path: Path) -> None:
    (tmp_path / "s2cs.db").write_bytes(b"")  # e.g. a store of an older release, emptied
    with pytest.raises(StateError, match="is empty"):
        open_store(str(tmp_path), load_instance(str(tmp_path)))


def test_an_unreadable_marker_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "s2cs.instance").write_text("{broken")
    with pytest.raises(StateError, match="instance marker"):
        load_instance(str(tmp_path))
