"""How s2uc prints: the 1.x lines people grep, JSON for machines, rich tables for status."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Group
from rich.table import Table
from rich.text import Text

from scistream._proto import scistream_pb2 as pb
from scistream.grpcutil import INVALID_TOKEN


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def header(uid: str, s2cs: str, token: str | None, role: str) -> None:
    """1.x's ``uid; s2cs; access_token; role`` header; the token itself is never printed."""
    click.echo("uid; s2cs; access_token; role")
    click.echo(f"{uid} {s2cs} {'***' if token else INVALID_TOKEN} {role}")


def pb_text_lines(field: str, values: Sequence[str]) -> None:
    """1.x printed the protobuf Response as text: ``listeners: "1.2.3.4:5100"``, one per line."""
    for v in values:
        click.echo(f'{field}: "{v}"')


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_rate(bps: float) -> str:
    bits = bps * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits < 1000 or unit == "Gbit/s":
            return f"{bits:.0f} {unit}" if unit == "bit/s" else f"{bits:.1f} {unit}"
        bits /= 1000
    return f"{bits:.1f} Gbit/s"  # pragma: no cover


def session_dict(s: pb.SessionStatus) -> dict[str, Any]:
    return {
        "uid": s.uid,
        "role": s.role,
        "state": s.state,
        "listeners": list(s.listeners),
        "targets": list(s.targets),
        "prod_listeners": list(s.prod_listeners),
        "security": s.security,
        "num_conn": s.num_conn,
        "rate_limit": s.rate_limit,
        "backend": s.backend,
        "owner": s.owner,
        "created_at": s.created_at,
        "last_activity": s.last_activity,
        "bytes_to_target": s.bytes_to_target,
        "bytes_from_target": s.bytes_from_target,
        "connections_active": s.connections_active,
        "connections_total": s.connections_total,
        "error": s.error,
        "listener_nodes": list(s.listener_nodes),
        "lost_connections": list(s.lost_connections),
        "connections": [
            {
                "listener": c.listener,
                "peer": c.peer,
                "target": c.target,
                "bytes_to_target": c.bytes_to_target,
                "bytes_from_target": c.bytes_from_target,
                "started_at": c.started_at,
                "rate_to_target": c.rate_to_target,
                "rate_from_target": c.rate_from_target,
            }
            for c in s.connections
        ],
    }


def sessions_table(sessions: Sequence[pb.SessionStatus], title: str) -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    for col in (
        "uid",
        "role",
        "state",
        "security",
        "listeners",
        "targets",
        "conns",
        "to target",
        "from target",
        "age",
    ):
        table.add_column(col, no_wrap=col in ("uid", "state"))
    now = time.time()
    for s in sessions:
        age = f"{now - s.created_at:.0f} s" if s.created_at else "-"
        table.add_row(
            s.uid,
            s.role,
            Text(s.state, style="red" if s.state in ("failed", "expired") else ""),
            s.security or "-",
            "\n".join(_with_nodes(s)) or "-",
            "\n".join(s.targets) or "-",
            f"{s.connections_active}/{s.connections_total}",
            human_bytes(s.bytes_to_target),
            human_bytes(s.bytes_from_target),
            age,
        )
    return table


def connections_table(s: pb.SessionStatus) -> Table:
    table = Table(title=f"connections of {s.uid}", title_justify="left")
    for col in ("listener", "peer", "target", "to target", "rate", "from target", "rate"):
        table.add_column(col)
    for c in s.connections:
        table.add_row(
            c.listener,
            c.peer,
            c.target,
            human_bytes(c.bytes_to_target),
            human_rate(c.rate_to_target),
            human_bytes(c.bytes_from_target),
            human_rate(c.rate_from_target),
        )
    return table


def status_view(sessions: Sequence[pb.SessionStatus], s2cs: str) -> Group:
    parts: list[Any] = [sessions_table(sessions, f"sessions on {s2cs}")]
    for s in sessions:
        if s.error:
            parts.append(Text(f"{s.uid}: {s.error}", style="red"))
        for lost in s.lost_connections:
            parts.append(Text(f"{s.uid}: {lost}", style="yellow"))
        if s.connections:
            parts.append(connections_table(s))
    return Group(*parts)


def status_lines(sessions: Sequence[pb.SessionStatus]) -> list[str]:
    """Plain text for pipes and logs, where a table would be squeezed to 80 columns."""
    lines: list[str] = []
    for s in sessions:
        lines.append(
            f"{s.uid}  {s.role}  {s.state}  security={s.security or '-'}  backend={s.backend or '-'}"
        )
        lines.append(f"  listeners: {', '.join(_with_nodes(s)) or '-'}")
        lines.append(f"  targets:   {', '.join(s.targets) or '-'}")
        lines.append(
            f"  bytes: {s.bytes_to_target} to target, {s.bytes_from_target} from target; "
            f"connections: {s.connections_active} active, {s.connections_total} total"
        )
        for c in s.connections:
            lines.append(
                f"  conn {c.peer} -> {c.listener} -> {c.target}: {c.bytes_to_target} B "
                f"({human_rate(c.rate_to_target)}) to target, {c.bytes_from_target} B "
                f"({human_rate(c.rate_from_target)}) back"
            )
        for lost in s.lost_connections:
            lines.append(f"  lost: {lost}")
        if s.error:
            lines.append(f"  error: {s.error}")
    return lines


def _with_nodes(s: pb.SessionStatus) -> list[str]:
    """Each listener, with the gateway node carrying it where the gateway has several."""
    if len(s.listener_nodes) != len(s.listeners):
        return list(s.listeners)
    return [f"{ep} ({node})" for ep, node in zip(s.listeners, s.listener_nodes, strict=True)]
