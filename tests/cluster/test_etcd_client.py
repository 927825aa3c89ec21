"""scistream.etcd.EtcdClient against a real 3-member etcd cluster (etcd_cluster fixture).

Failure tests kill or stop members by PID and hold the client to the time bounds the
multi-node gateway relies on: writes again within 5 s of losing the leader, a clear
EtcdUnavailable within 2.5 s when the quorum is gone, recovery with the same client.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from etcd_cluster import EtcdCluster

from scistream.etcd import (
    Compare,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Op,
    TxnResult,
    WatchEvent,
)

pytestmark = pytest.mark.timeout(60)


def test_get_put_delete_and_prefix(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        try:
            kvs, rev0 = await c.get(b"/t/a")
            assert kvs == [] and rev0 >= 1
            r1 = await c.put(b"/t/a", b"1")
            r2 = await c.put(b"/t/b", b"2")
            await c.put(b"/t\xff", b"outside")  # sorts right after the prefix: must not match
            assert r2 == r1 + 1
            kvs, rev = await c.get(b"/t/a")
            assert rev >= r2
            assert kvs == [KeyValue(b"/t/a", b"1", r1, r1, 1, 0)]
            r3 = await c.put(b"/t/a", b"3")
            (kv,), _ = await c.get(b"/t/a")
            assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"3", r1, r3, 2)
            kvs, _ = await c.get(b"/t/", prefix=True)
            assert [(k.key, k.value) for k in kvs] == [(b"/t/a", b"3"), (b"/t/b", b"2")]
            kvs, _ = await c.get(b"/t/", prefix=True, keys_only=True)
            assert [(k.key, k.value) for k in kvs] == [(b"/t/a", b""), (b"/t/b", b"")]
            r4 = await c.delete(b"/t/b")
            assert r4 == r3 + 1
            assert (await c.get(b"/t/b"))[0] == []
            await c.put(b"/t/c", b"4")
            await c.delete(b"/t/", prefix=True)
            assert (await c.get(b"/t/", prefix=True))[0] == []
            assert [k.key for k in (await c.get(b"/t\xff"))[0]] == [b"/t\xff"]
        finally:
            await c.close()

    asyncio.run(main())


def test_txn_create_if_absent_one_winner_of_50(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        clients = [EtcdClient(etcd_cluster.endpoints, timeout=10.0) for _ in range(5)]
        key = b"/s/sessions/uid-1"
        try:

            async def contend(n: int) -> TxnResult:
                c = clients[n % len(clients)]
                return await c.txn(
                    [Compare.create_revision(key, "==", 0)],
                    [Op.put(key, f"owner-{n}".encode())],
                    [Op.get(key)],
                )

            results = await asyncio.gather(*(contend(n) for n in range(50)))
            winners = [n for n, r in enumerate(results) if r.succeeded]
            assert len(winners) == 1
            (kv,), _ = await clients[0].get(key)
            assert kv.value == f"owner-{winners[0]}".encode()
            win = results[winners[0]]
            assert win.responses == [[]] and win.revision == kv.create_revision
            for r in results:
                if not r.succeeded:
                    # Each loser sees the winner's record in its failure branch.
                    assert r.responses == [[kv]]
        finally:
            for c in clients:
                await c.close()

    asyncio.run(main())


def test_txn_compares(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        try:
            rev = await c.put(b"k", b"v1")
            ok = await c.txn([Compare.value(b"k", "==", b"v1"), Compare.mod_revision(b"k", "==", rev)], [])
            assert ok.succeeded and ok.responses == []
            assert not (await c.txn([Compare.value(b"k", "!=", b"v1")], [])).succeeded
            assert (
                await c.txn([Compare.version(b"k", ">", 0), Compare.create_revision(b"k", "<", rev + 1)], [])
            ).succeeded
            moved = await c.txn(
                [Compare.version(b"k", "==", 1)], [Op.put(b"k2", b"x"), Op.delete(b"k"), Op.get(b"k2")]
            )
            assert moved.succeeded and moved.responses[:2] == [[], []]
            assert [kv.value for kv in moved.responses[2]] == [b"x"]
            assert (await c.get(b"k"))[0] == []
        finally:
            await c.close()

    asyncio.run(main())


def test_lease_keepalive_and_expiry_deletes_keys(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        try:
            lease = await c.lease_grant(2)
            await c.put(b"/n/a", b"alive", lease=lease)
            (kv,), _ = await c.get(b"/n/a")
            assert kv.lease == lease
            # Kept alive past its TTL: the key stays.
            for _ in range(4):
                await asyncio.sleep(0.7)
                assert 1 <= await c.lease_keepalive(lease) <= 2
            assert [k.key for k in (await c.get(b"/n/a"))[0]] == [b"/n/a"]
            # Left alone: etcd expires it and deletes its key.
            t0 = time.monotonic()
            while (await c.get(b"/n/a"))[0]:
                assert time.monotonic() - t0 < 6, "leased key outlived its lease"
                await asyncio.sleep(0.1)
            assert await c.lease_keepalive(lease) == 0
            # Revoke deletes at once; revoking again is not an error.
            lease2 = await c.lease_grant(30)
            await c.put(b"/n/b", b"x", lease=lease2)
            await c.lease_revoke(lease2)
            assert (await c.get(b"/n/b"))[0] == []
            await c.lease_revoke(lease2)
            assert await c.lease_keepalive(lease2) == 0
        finally:
            await c.close()

    asyncio.run(main())


def test_lease_compare_fences_writes(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        node = b"/p/nodes/a"
        try:
            lease = await c.lease_grant(30)
            await c.put(node, b"{}", lease=lease)
            fenced = [Compare.lease(node, "==", lease)]
            assert (await c.txn(fenced, [Op.put(b"/p/ports/a/5100", b"uid")])).succeeded
            # The node lost its lease (expired, revoked): its writes are refused.
            await c.lease_revoke(lease)
            r = await c.txn(fenced, [Op.put(b"/p/ports/a/5101", b"uid")])
            assert not r.succeeded
            assert (await c.get(b"/p/ports/a/5101"))[0] == []
            # Another node's record on a new lease does not let the old lease's writes through.
            lease2 = await c.lease_grant(30)
            await c.put(node, b"{}", lease=lease2)
            assert not (await c.txn(fenced, [Op.put(b"/p/x", b"1")])).succeeded
            assert (await c.txn([Compare.lease(node, "==", lease2)], [Op.put(b"/p/x", b"1")])).succeeded
        finally:
            await c.close()

    asyncio.run(main())


async def _next(it: object, timeout: float = 5.0) -> list[WatchEvent]:
    return await asyncio.wait_for(it.__anext__(), timeout)  # type: ignore[attr-defined]


def test_watch_in_order_then_unavailable_on_kill_and_rewatch_misses_nothing(
    etcd_cluster: EtcdCluster,
) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        try:
            start = await c.put(b"/w/a", b"1")
            await c.put(b"/w/b", b"2")
            await c.delete(b"/w/a")
            await c.put(b"/wz", b"not under the prefix")
            last = await c.put(b"/w/c", b"3")
            seen: list[WatchEvent] = []
            w = c.watch(b"/w/", start)
            while not seen or seen[-1].kv.mod_revision < last:
                seen += await _next(w)
            assert [(e.type, e.kv.key, e.kv.value) for e in seen] == [
                ("put", b"/w/a", b"1"),
                ("put", b"/w/b", b"2"),
                ("delete", b"/w/a", b""),
                ("put", b"/w/c", b"3"),
            ]
            revs = [e.kv.mod_revision for e in seen]
            assert revs == sorted(revs) and revs[0] == start and revs[-1] == last

            # Kill the member serving the watch: the stream raises EtcdUnavailable.
            watched = 0  # a client starts on its first endpoint and stays while it answers
            etcd_cluster.kill(watched)
            writer = EtcdClient([e for i, e in enumerate(etcd_cluster.endpoints) if i != watched], timeout=8)
            # (the killed member may have been the leader: these wait out the election)
            written = [await writer.put(b"/w/d", b"4"), await writer.put(b"/w/e", b"5")]
            with pytest.raises(EtcdUnavailable, match="etcd"):
                while True:
                    seen += await _next(w)
            await w.aclose()
            # Re-watch from last + 1 (fails over to a live member): nothing missed, nothing twice.
            w2 = c.watch(b"/w/", seen[-1].kv.mod_revision + 1)
            more: list[WatchEvent] = []
            while not more or more[-1].kv.mod_revision < written[-1]:
                more += await _next(w2)
            await w2.aclose()
            all_events = seen + more
            assert [e.kv.key for e in all_events][-2:] == [b"/w/d", b"/w/e"]
            assert len({e.kv.mod_revision for e in all_events}) == len(all_events)
            await writer.close()
        finally:
            await c.close()

    asyncio.run(main())


def test_watch_of_compacted_revision_raises(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        try:
            first = await c.put(b"/k", b"1")
            await c.put(b"/k", b"2")
            last = await c.put(b"/k", b"3")
            etcd_cluster.compact(last)
            w = c.watch(b"/k", first)
            with pytest.raises(EtcdCompacted) as info:
                await _next(w)
            assert info.value.compact_revision == last
            await w.aclose()
        finally:
            await c.close()

    asyncio.run(main())


def test_leader_kill_writes_resume_within_5s(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        leader = etcd_cluster.leader()
        # Start on the leader, so the client must fail over, not just carry on elsewhere.
        eps = etcd_cluster.endpoints
        c = EtcdClient(eps[leader:] + eps[:leader])
        try:
            await c.put(b"/l", b"before")
            etcd_cluster.kill(leader)
            t0 = time.monotonic()
            while True:
                try:
                    await c.put(b"/l", b"after")
                    break
                except EtcdUnavailable:
                    assert time.monotonic() - t0 < 5.0, "no write within 5 s of the leader's death"
            elapsed = time.monotonic() - t0
            assert elapsed < 5.0
            assert (await c.get(b"/l"))[0][0].value == b"after"
        finally:
            await c.close()

    asyncio.run(main())


def test_quorum_loss_fails_fast_and_recovers_with_the_same_client(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        try:
            rev = await c.put(b"/q", b"1")
            leader = etcd_cluster.leader()
            down = [i for i in range(3) if i != leader]  # keep the leader: the worst case
            # A watch on the survivor: it must end once the member knows it has no leader.
            survivor = EtcdClient([etcd_cluster.endpoints[leader]])
            w = survivor.watch(b"/q", rev + 1)
            first = asyncio.ensure_future(w.__anext__())
            await asyncio.sleep(0.2)
            for i in down:
                etcd_cluster.stop(i)
            t_stop = time.monotonic()
            for _ in range(2):  # at once, and once the survivor has noticed it has no quorum
                t0 = time.monotonic()
                with pytest.raises(EtcdUnavailable, match="no quorum or cannot be reached"):
                    await c.put(b"/q", b"2")
                assert time.monotonic() - t0 < 2.5
            with pytest.raises(EtcdUnavailable):
                await c.get(b"/q")
            # etcd cancels "hasleader" watches after 3 election timeouts without a leader.
            with pytest.raises(EtcdUnavailable):
                await asyncio.wait_for(first, 10)
            assert time.monotonic() - t_stop < 10
            await w.aclose()
            await survivor.close()
            for i in down:
                etcd_cluster.start(i)
            t0 = time.monotonic()
            while True:
                try:
                    await c.put(b"/q", b"3")
                    break
                except EtcdUnavailable:
                    assert time.monotonic() - t0 < 15, "writes did not come back after the restart"
            assert (await c.get(b"/q"))[0][0].value == b"3"
        finally:
            await c.close()

    asyncio.run(main())


def test_close_ends_a_running_watch_with_etcd_error(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(etcd_cluster.endpoints)
        rev = await c.put(b"/c", b"1")
        got: list[list[WatchEvent]] = []

        async def consume() -> None:
            async for batch in c.watch(b"/c", rev):
                got.append(batch)

        task = asyncio.create_task(consume())
        while not got:
            await asyncio.sleep(0.05)
        await c.close()
        # Not a CancelledError out of a task nobody cancelled: an EtcdError saying why.
        with pytest.raises(EtcdError, match="closed"):
            await asyncio.wait_for(task, 5)
        with pytest.raises(EtcdError, match="is closed"):
            await c.get(b"/c")

    asyncio.run(main())
