"""The engine's tuning knobs as click options, shared by `s2ds serve` and `s2ds forward`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

import click

from scistream.dataplane import InvalidRoute, Tuning
from scistream.dataplane.api import AES_GCM_CHOICES
from scistream.s2ds.units import parse_size

F = TypeVar("F", bound=Callable[..., Any])


class SizeType(click.ParamType):
    """A byte count with an optional binary K/M/G suffix."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()
_D = Tuning()

#: (option declaration, type, help); defaults come from api.Tuning so they cannot drift.
KNOBS: list[tuple[str, Any, str]] = [
    ("--workers", int, f"Worker threads, one epoll loop each; 0 = one per online CPU [{_D.workers}]."),
    ("--pipe-size", SIZE, f"Bytes per splice() pipe (one per direction of a plain leg) [{_D.pipe_size}]."),
    ("--tls-buffer-size", SIZE, f"Bytes of userspace buffer per TLS direction [{_D.tls_buffer_size}]."),
    ("--sndbuf", SIZE, "SO_SNDBUF of every socket; 0 = kernel autotuning [0]."),
    ("--rcvbuf", SIZE, "SO_RCVBUF of every socket; 0 = kernel autotuning [0]."),
    ("--nodelay/--no-nodelay", None, "TCP_NODELAY on every socket [on]."),
    ("--congestion", str, "TCP congestion control by name (bbr, cubic); empty = system default."),
    ("--notsent-lowat", SIZE, "TCP_NOTSENT_LOWAT in bytes; 0 = unset [0]."),
    ("--cpu-affinity/--no-cpu-affinity", None, "Pin worker i to online CPU i mod n [off]."),
    ("--backlog", int, f"listen() backlog of every route [{_D.backlog}]."),
    ("--max-connections", int, "Connections per route when the route sets none; 0 = unlimited [0]."),
    (
        "--connect-timeout",
        float,
        f"Seconds to connect to a target and finish a TLS handshake [{_D.connect_timeout:g}].",
    ),
    ("--idle-timeout", float, "Seconds without a byte either way before a connection is cut; 0 = never [0]."),
    ("--tcp-user-timeout", int, "TCP_USER_TIMEOUT in milliseconds; 0 = kernel default [0]."),
    (
        "--tls-key-update-bytes",
        SIZE,
        f"Send a TLS 1.3 KeyUpdate after this many bytes per key [{_D.tls_key_update_bytes}].",
    ),
    (
        "--tls-aes-gcm",
        click.Choice(AES_GCM_CHOICES),
        "Who seals TLS 1.3 AES-GCM records: auto = intel-ipsec-mb on CPUs with VAES (AVX-512) "
        f"where the build has it, else OpenSSL; openssl; ipsec-mb (fails where unusable) [{_D.tls_aes_gcm}].",
    ),
]


def tuning_options(func: F) -> F:
    """Add one option per Tuning field (unset options keep Tuning's default)."""
    for decl, typ, help_text in reversed(KNOBS):
        if typ is None:
            func = click.option(decl, default=None, help=help_text)(func)
        else:
            func = click.option(decl, type=typ, default=None, help=help_text)(func)
    return func


def tuning_from_options(options: dict[str, Any]) -> Tuning:
    """Pop the knob values out of a command's kwargs and build a Tuning (UsageError if invalid)."""
    given = {}
    for f in fields(Tuning):
        value = options.pop(f.name, None)
        if value is not None:
            given[f.name] = value
    try:
        return Tuning(**given)
    except InvalidRoute as exc:
        raise click.UsageError(str(exc)) from None
