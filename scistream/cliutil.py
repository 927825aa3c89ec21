"""Click pieces the user-facing tools (s2uc, appctrl) share: a failure shown as one
``<tool>: error: ...`` line with its own exit code, and subcommands accepted in
both the dash and the underscore spelling (1.x scripts use either)."""

from __future__ import annotations

from typing import Any, ClassVar

import click


class ToolError(click.ClickException):
    """One line on stderr, prefixed with the tool's name; exits with ``exit_code``."""

    tool: ClassVar[str] = "scistream"

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        # click declares exit_code a class variable; each of our errors carries its own.
        setattr(self, "exit_code", exit_code)  # noqa: B010

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.tool}: error: {self.message}", err=True)


class BothSpellingsGroup(click.Group):
    """Finds ``inbound_request`` as well as ``inbound-request``."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or super().get_command(ctx, cmd_name.replace("_", "-"))
