"""Click pieces the user-facing tools (s2uc, appctrl) share: a failure shown as one
``<tool>: error: ...`` line with its own exit code, subcommands accepted in both
the dash and the underscore spelling (1.x scripts use either), and the options
that say how to reach an s2cs over gRPC."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class ToolError(click.ClickException):
    """One line on stderr, prefixed with the tool's name; exits with ``exit_code``."""

    tool: ClassVar[str] = "scistream"

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        # click declares exit_code a class variable; each of our errors carries its own.
        setattr(self, "exit_code", exit_code)  # noqa: B010

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.tool}: error: {self.message}", err=True)


# The longest wait any option means: a year. Beyond it, deadlines overflow timers
# (gRPC, time_t, the engine's nanoseconds) instead of meaning anything.
MAX_SECONDS = 365 * 86400.0


class Seconds(click.FloatRange):
    """A duration in seconds: a finite number in [min, max] (nan and inf are refused,
    which click's FloatRange lets through)."""

    name = "seconds"

    def __init__(self, min: float = 0.0, max: float = MAX_SECONDS, *, min_open: bool = False) -> None:
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


INT32_MAX = 2**31 - 1


def zmq_reason(exc: Exception) -> str:
    """The errno text of a ZMQError, without pyzmq's "(addr=...)" the caller already names."""
    errno = getattr(exc, "errno", None)
    return os.strerror(errno) if isinstance(errno, int) and 0 < errno < 1000 else str(exc)


class BothSpellingsGroup(click.Group):
    """Finds ``inbound_request`` as well as ``inbound-request``."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or super().get_command(ctx, cmd_name.replace("_", "-"))


def bundle_options(name: str, build: Callable[..., Any], keys: Sequence[str]) -> Callable[[F], F]:
    """Call the command with the option values ``keys`` folded into one argument,
    ``name=build(**values)``. Apply it before (below) the options it folds: click
    calls the wrapper with every option, and the options are declared on it."""

    def deco(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in keys}
            return f(*args, **kwargs, **{name: build(**values)})

        return wrapper  # type: ignore[return-value]

    return deco


def s2cs_tls_options(env_prefix: str, cert_help: str) -> list[Callable[[F], F]]:
    """``--server_cert``, ``--ssl`` and ``--no-ssl``, spelled as 1.x scripts spell them
    (``--ssl False`` too); the command gets ``server_cert``, ``ssl`` and ``no_ssl``."""
    return [
        click.option(
            "--server_cert",
            "--server-cert",
            "server_cert",
            default="server.crt",
            envvar=[env_prefix + "SERVER_CERT"],
            show_default=True,
            help=cert_help,
        ),
        click.option(
            "--ssl",
            "ssl",
            type=click.BOOL,
            is_flag=False,
            flag_value=True,
            default=True,
            envvar=[env_prefix + "SSL"],
            help="TLS to the s2cs (1.x: --ssl False for plaintext).",
        ),
        click.option(
            "--no-ssl",
            "--no_ssl",
            "no_ssl",
            is_flag=True,
            help="Plaintext gRPC (testing only; same as --ssl False).",
        ),
    ]
