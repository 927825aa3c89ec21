"""The multi-node gateway's pure parts (issue 12): placement policies, key names,
session records and the sealing of session keys for etcd."""

from __future__ import annotations

import base64
import os
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistream.s2cs.cluster.layout import ClusterRecord, Keyspace, NodeInfo, Placement, Sealer, SealError
from scistream.s2cs.cluster.placement import NoRoom, place
from scistream.s2cs.sessions import Event, Session, SessionMachine


def test_spread_goes_round_the_nodes_least_loaded_first() -> None:
    got = place(6, ["a", "b", "c"], {"a": 5, "b": 0, "c": 1}, {"a": 10, "b": 10, "c": 10}, "spread")
    assert got == ["b", "c", "a", "b", "c", "a"]


def test_pack_puts_a_session_on_one_node_when_one_has_room() -> None:
    assert place(4, ["a", "b"], {"a": 1, "b": 0}, {"a": 10, "b": 10}, "pack") == ["b"] * 4
    # No single node has room for 4: the least loaded are filled instead.
    assert Counter(place(4, ["a", "b"], {}, {"a": 2, "b": 3}, "pack")) == Counter({"a": 2, "b": 2})


def test_load_evens_out_connections() -> None:
    got = place(5, ["a", "b", "c"], {"a": 3, "b": 0, "c": 1}, {"a": 9, "b": 9, "c": 9}, "load")
    final = Counter({"a": 3, "b": 0, "c": 1}) + Counter(got)
    assert max(final.values()) - min(final.values()) <= 1


def test_too_few_ports_is_refused_with_each_nodes_room() -> None:
    with pytest.raises(NoRoom, match="a: 1, b: 0"):
        place(2, ["a", "b"], {}, {"a": 1, "b": 0}, "spread")


@given(
    n=st.integers(1, 40),
    rooms=st.dictionaries(st.sampled_from("abcde"), st.integers(0, 12), min_size=1),
    policy=st.sampled_from(["spread", "pack", "load"]),
)
def test_placement_never_overfills_a_node(n: int, rooms: dict[str, int], policy: str) -> None:
    try:
        got = place(n, list(rooms), {}, rooms, policy)
    except NoRoom:
        assert sum(rooms.values()) < n
        return
    assert len(got) == n
    for node, count in Counter(got).items():
        assert count <= rooms[node]


def _record(psk: bytes) -> ClusterRecord:
    s = Session(uid="u1", role="PROD", owner="o", owner_name="", num_conn=2, rate=0, rate_limit=0,
                security="tls", ports=[5100, 5101], listeners=["127.0.0.1:5100", "127.0.0.2:5101"],
                machine=SessionMachine(), psk=psk, psk_identity="u1")  # fmt: skip
    s.machine.fire(Event.REQ)
    return ClusterRecord(
        s, [Placement("a", 5100, "127.0.0.1:5100"), Placement("b", 5101, "127.0.0.2:5101")], "a"
    )


def test_a_record_keeps_its_key_sealed_and_comes_back_whole() -> None:
    psk = os.urandom(32)
    sealer = Sealer(os.urandom(32))
    raw = _record(psk).encode(sealer)
    for form in (psk, psk.hex().encode(), base64.b64encode(psk)):
        assert form not in raw
    back = ClusterRecord.decode(raw, sealer, 7)
    assert back.session.psk == psk and back.mod_revision == 7
    assert back.nodes() == ["a", "b"] and back.on_node("b") == [1]


def test_a_key_sealed_for_one_session_does_not_open_for_another_or_another_cluster_key() -> None:
    sealer = Sealer(os.urandom(32))
    sealed = sealer.seal("u1", b"k" * 32)
    with pytest.raises(SealError, match="same --etcd-key-file"):
        sealer.open("u2", sealed)
    with pytest.raises(SealError):
        Sealer(os.urandom(32)).open("u1", sealed)


def test_keyspace_names_and_splits_every_key() -> None:
    keys = Keyspace("/scistream/v1/")
    assert keys.port("n1", 5100) == b"/scistream/v1/ports/n1/5100"
    assert keys.split(keys.applied("u", "n2")) == ("applied", ["u", "n2"])
    assert keys.split(b"/other/sessions/u") == ("", [])
    with pytest.raises(ValueError):
        Keyspace("scistream")
    info = NodeInfo("n1", "abcd", "127.0.0.1", 5100, 5200, "127.0.0.1:5000")
    assert NodeInfo.decode(info.encode()) == info
