"""A released session's key is gone from the s2cs state directory's bytes on disk.

Found while looking for more bugs of issue 14 item 5's kind: the store's module doc
promises that a deleted row's key lingers neither in a free page (secure_delete) nor in
old WAL frames (checkpoint and truncate), and no test looked at the files. Here the raw
bytes of the database, its WAL and its shared-memory file are searched for every key,
with the store still open (as while s2cs runs) and after it is closed. A session that is
still alive is the positive control: its key must be found, or the scan proves nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from scistream.s2cs.store import SessionStore


def disk_bytes(state: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(state.iterdir()) if p.is_file())


def test_released_keys_leave_no_trace_on_disk(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = SessionStore(str(state / "s2cs.db"))
    live_key = os.urandom(32)
    store.save("live", {"uid": "live", "role": "PROD"}, live_key)
    gone: list[bytes] = []
    for i in range(40):
        uid = f"s{i}"
        store.save(uid, {"uid": uid, "role": "CONS"}, b"")
        key = os.urandom(32)
        # The key arrives in update: the upsert path writes the row a second time.
        store.save(uid, {"uid": uid, "role": "CONS", "targets": ["127.0.0.1:1"]}, key)
        store.save(uid, {"uid": uid, "role": "CONS", "state": "active"}, key)
        gone.append(key)
    for i in range(40):
        store.delete(f"s{i}")
    try:
        raw = disk_bytes(state)
        assert live_key in raw, "the live session's key is not on disk: the scan proves nothing"
        assert not [k for k in gone if k in raw], "a released session's key is still on disk (store open)"
        assert [psk for _, psk in store.load()] == [live_key]
    finally:
        store.close()
    raw = disk_bytes(state)
    assert live_key in raw
    assert not [k for k in gone if k in raw], "a released session's key is still on disk (store closed)"
