"""Which node carries each connection of a session (``--placement``): no I/O here.

* ``spread``: round robin over the live nodes, starting with the least loaded, so one
  session's bandwidth grows with the number of nodes;
* ``pack``: every connection on one node (the least loaded one with room), so a
  session touches as few nodes as possible;
* ``load``: each connection on whichever node carries the fewest connections at that
  moment (the session's own connections counted as they are placed).

"Load" is the number of connections a node carries (its reserved data ports). Nodes
are ordered by name on ties, so every node computes the same placement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class NoRoom(Exception):
    """The live nodes do not have the free ports the session needs (one sentence)."""


def place(
    num_conn: int,
    nodes: Sequence[str],
    load: Mapping[str, int],
    room: Mapping[str, int],
    policy: str,
) -> list[str]:
    """One node name per connection. ``load``: connections each node carries now;
    ``room``: free data ports each node has."""
    if num_conn < 1:
        raise ValueError("place at least one connection")
    live = sorted(n for n in nodes if room.get(n, 0) > 0)
    if sum(room.get(n, 0) for n in live) < num_conn:
        free = ", ".join(f"{n}: {room.get(n, 0)}" for n in sorted(nodes)) or "no live node"
        raise NoRoom(
            f"the gateway's nodes have too few free data ports for {num_conn} connection(s) ({free})"
        )
    left = {n: room[n] for n in live}
    carried = {n: load.get(n, 0) for n in live}
    if policy == "pack":
        fits = [n for n in live if left[n] >= num_conn]
        if fits:
            best = min(fits, key=lambda n: (carried[n], n))
            return [best] * num_conn
        policy = "load"  # no single node has room: fall back to filling the least loaded
    out: list[str] = []
    if policy == "spread":
        order = sorted(live, key=lambda n: (carried[n], n))
        i = 0
        while len(out) < num_conn:
            n = order[i % len(order)]
            i += 1
            if left[n] > 0:
                out.append(n)
                left[n] -= 1
        return out
    if policy != "load":
        raise ValueError(f"unknown placement policy {policy!r}")
    for _ in range(num_conn):
        n = min((n for n in live if left[n] > 0), key=lambda n: (carried[n], n))
        out.append(n)
        left[n] -= 1
        carried[n] += 1
    return out
