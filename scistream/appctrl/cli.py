"""``appctrl``: the application controller (1.x commands, plus ``run``).

1.x command lines keep working (``appctrl mock <uid> <s2cs> <token> <role> <ip>``);
the certificate, ports and timing that 1.x hard-coded are options here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

import click

from scistream import __version__
from scistream.appctrl import apps
from scistream.appctrl.controller import AppController, ReadySession
from scistream.cliutil import (
    INT32_MAX,
    BothSpellingsGroup,
    Seconds,
    ToolError,
    bundle_options,
    s2cs_tls_options,
)
from scistream.endpoints import InvalidEndpoint, format_endpoint, parse_endpoint
from scistream.grpcutil import INVALID_TOKEN, ControlError, ExitCode, check_uid, port_list, split_csv
from scistream.programs import TOOLS, tool_argv
from scistream.s2ds.keys import CurveKeyError, load_keypair, load_public
from scistream.s2uc import tokens
from scistream.s2uc.config import load_config
from scistream.s2uc.tokens import TokenStore

log = logging.getLogger(__name__)

DEFAULT_MOCK_PORTS = "5074,5075,5076,37000,47000"
ENV_PREFIX = "SCISTREAM_APPCTRL_"


class AppctrlError(ToolError):
    tool = "appctrl"


class AppctrlGroup(BothSpellingsGroup):
    """Both spellings of every subcommand; ControlError and app failures become one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ControlError as exc:
            raise AppctrlError(exc.message, exc.exit_code) from None
        except InvalidEndpoint as exc:
            raise AppctrlError(str(exc), ExitCode.USAGE) from None
        except TimeoutError as exc:
            raise AppctrlError(str(exc), ExitCode.TIMEOUT) from None
        except (FileNotFoundError, apps.AppError) as exc:
            raise AppctrlError(str(exc), ExitCode.FAILURE) from None
        except KeyboardInterrupt:
            raise AppctrlError("interrupted", 130) from None


@dataclasses.dataclass(frozen=True)
class S2csLink:
    """How to reach the s2cs: --server_cert, --ssl / --no-ssl, --timeout and the events keys."""

    server_cert: str
    ssl: bool
    timeout: float
    events_server_key: str = ""
    events_client_key: str = ""

    def events_curve(self) -> tuple[bytes, tuple[bytes, bytes]] | None:
        if not (self.events_server_key or self.events_client_key):
            return None
        if not (self.events_server_key and self.events_client_key):
            raise ControlError(
                "CURVE events need both --events-server-key and --events-client-key", ExitCode.USAGE
            )
        try:
            return load_public(self.events_server_key), load_keypair(self.events_client_key)
        except CurveKeyError as exc:
            raise ControlError(str(exc), ExitCode.USAGE) from None

    def controller(self, s2cs: str, uid: str, role: str, token: str | None) -> AppController:
        """``token`` as given on the command line: empty or 1.x's placeholder means none."""
        return AppController(
            s2cs,
            uid,
            role=role,
            server_cert=self.server_cert,
            ssl=self.ssl,
            token=_token(token, s2cs),
            timeout=self.timeout,
            events_curve=self.events_curve(),
        )

    def hello(self, s2cs: str, uid: str, role: str, token: str | None, listeners: list[str]) -> list[str]:
        """Send one hello; the s2cs's listeners for the session (empty before they exist)."""

        async def send() -> list[str]:
            async with self.controller(s2cs, uid, role, token) as ctl:
                return await ctl.hello(listeners)

        return asyncio.run(send())


def _s2cs_link(
    *,
    server_cert: str,
    ssl: bool,
    no_ssl: bool,
    timeout: float,
    events_server_key: str | None,
    events_client_key: str | None,
) -> S2csLink:
    return S2csLink(
        server_cert=server_cert,
        ssl=ssl and not no_ssl,
        timeout=timeout,
        events_server_key=events_server_key or "",
        events_client_key=events_client_key or "",
    )


def server_options(f: Any) -> Any:
    """The options that say how to reach the s2cs, passed on as ``link`` (S2csLink)."""
    names = ("server_cert", "ssl", "no_ssl", "timeout", "events_server_key", "events_client_key")
    f = bundle_options("link", _s2cs_link, names)(f)
    opts = [
        *s2cs_tls_options(ENV_PREFIX, "The s2cs certificate to pin."),
        click.option(
            "--timeout",
            type=Seconds(0.1),
            default=15.0,
            show_default=True,
            help="Deadline per call in seconds.",
        ),
        click.option(
            "--events-server-key",
            "--events_server_key",
            "events_server_key",
            default=None,
            envvar=[ENV_PREFIX + "EVENTS_SERVER_KEY"],
            help="The s2cs's events CURVE public key (.key file), for a tcp:// events socket "
            f"[${ENV_PREFIX}EVENTS_SERVER_KEY]. Without events, readiness is polled.",
        ),
        click.option(
            "--events-client-key",
            "--events_client_key",
            "events_client_key",
            default=None,
            envvar=[ENV_PREFIX + "EVENTS_CLIENT_KEY"],
            help="This subscriber's CURVE key pair (.key_secret from `s2ds keygen`; its .key "
            f"must be in the s2cs's --events-curve-client-keys) [${ENV_PREFIX}EVENTS_CLIENT_KEY].",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _endpoints(ip: str, ports: Sequence[int]) -> list[str]:
    try:
        return [format_endpoint(ip, p) for p in ports if parse_endpoint(format_endpoint(ip, p))]
    except InvalidEndpoint:
        raise ControlError(f"{ip!r} is not a host name or address", ExitCode.USAGE) from None


def _role(text: str) -> str:
    """PROD or CONS, any case. A 1.x s2cs reads every other role as CONS and ours refuses
    it, so a typo would leave a stray hello on the s2cs: refused before anything is sent."""
    role = text.strip().upper()
    if role not in ("PROD", "CONS"):
        raise ControlError(
            f"role {text!r} is not PROD (the producer's side) or CONS (the consumer's side)", ExitCode.USAGE
        )
    return role


def _token(token: str | None, s2cs: str) -> str | None:
    """The token to send: the one given, else (empty, or 1.x's placeholder) this user's
    `s2uc login` for the scope that s2uc.toml's [scopes] names for ``s2cs``, if any.

    An s2cs that checks tokens authenticates every hello (the tutorials type the
    placeholder next to an `s2uc login`); one that does not ignores the token.
    """
    if token and token != INVALID_TOKEN:
        return token
    try:
        scope = load_config().scope_for(s2cs)
        if not scope or not TokenStore().get(scope):
            return None
        return tokens.access_token(scope)
    except ControlError as exc:
        log.warning("not using the s2uc login for %s: %s", s2cs, exc)
        return None


@click.group(cls=AppctrlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appctrl")
@click.option("-v", "--verbose", "--v", is_flag=True, help="Log debug detail to stderr.")
def main(verbose: bool) -> None:
    """SciStream application controller: tell the s2cs where the application is, run demo apps."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


# ------------------------------------------------------------------ hello


@main.command()
@click.argument("uid")
@click.argument("s2cs")
@click.argument("token")
@click.argument("role")
@click.argument("ip")
@click.option("--ports", default=DEFAULT_MOCK_PORTS, show_default=True, help="Application ports (a,b,c).")
@server_options
def mock(
    *,
    uid: str,
    s2cs: str,
    token: str,
    role: str,
    ip: str,
    ports: str,
    link: S2csLink,
) -> None:
    """Send the hello for UID to S2CS: the application listens at IP:--ports.

    S2CS is host:port, or the nodes of one gateway host:port,host:port (tried in order
    while one answers UNAVAILABLE)."""
    role = _role(role)
    check_uid(uid)
    listeners = _endpoints(ip, port_list(ports, "--ports"))
    got = link.hello(s2cs, uid, role, token, listeners)
    click.echo("Hello message sent successfully")
    click.echo(f"prod_listeners: {listeners}")
    if got:
        click.echo(f"listeners: {got}")


@main.command("create-appctrl")
@click.argument("uid")
@click.argument("s2cs")
@click.argument("token")
@click.argument("role")
@click.option("--app", type=click.Choice(["zmq", "iperf"]), default="zmq", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Where the producer app listens.")
@click.option("--port", type=click.IntRange(1, 65535), default=7000, show_default=True)
@click.option(
    "--count", type=click.IntRange(0, INT32_MAX), default=1000, show_default=True, help="ZMQ messages."
)
@click.option(
    "--size",
    type=click.IntRange(0, 64 * 1024 * 1024),
    default=1024,
    show_default=True,
    help="ZMQ payload bytes.",
)
@click.option("--seconds", type=Seconds(0.1), default=10.0, show_default=True, help="iperf3 client duration.")
@server_options
def create_appctrl(
    *,
    uid: str,
    s2cs: str,
    token: str,
    role: str,
    app: str,
    host: str,
    port: int,
    count: int,
    size: int,
    seconds: float,
    link: S2csLink,
) -> None:
    """Hello for UID, then run the demo app: PROD serves at --host:--port, CONS connects to the listener."""
    role = _role(role)
    check_uid(uid)
    listeners = [format_endpoint(host, port)] if role == "PROD" else []
    got = link.hello(s2cs, uid, role, token, listeners)
    if role == "PROD":
        if app == "zmq":
            _report(apps.run_producer(listeners[0], count=count, size=size))
        else:
            sys.exit(apps.run_foreground(apps.iperf_server_cmd(port, bind=host)))
        return
    if not got:
        raise ControlError(f"the s2cs at {s2cs} answered the hello with no listener to connect to")
    if app == "zmq":
        _report(apps.run_consumer(got[0]))
    else:
        sys.exit(apps.run_foreground(apps.iperf_client_cmd(got[0], seconds=seconds)))


# ------------------------------------------------------------------ demo apps


def _report(report: apps.Report, as_json: bool = False) -> None:
    click.echo(report.to_json() if as_json else report.summary())
    if not report.complete or report.lost or report.corrupt:
        sys.exit(ExitCode.FAILURE)


@main.command("run-producer")
@click.argument("port", default="7000")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--count", type=click.IntRange(0, INT32_MAX), default=1000, show_default=True)
@click.option("--size", type=click.IntRange(0, 64 * 1024 * 1024), default=1024, show_default=True)
@click.option(
    "--rate", type=Seconds(0.0, 1e9), default=0.0, show_default=True, help="Messages/s (0: no pacing)."
)
@click.option("--wait-subscriber", type=Seconds(0.0), default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def run_producer(
    *, port: str, host: str, count: int, size: int, rate: float, wait_subscriber: float, as_json: bool
) -> None:
    """ZMQ demo producer: serve PORT (or HOST:PORT) and send numbered messages."""
    if ":" in port:
        bind = port
    elif port.isascii() and port.isdigit() and 1 <= int(port) <= 65535:
        bind = format_endpoint(host, int(port))
    else:
        raise ControlError(f"PORT {port!r} is not a port number or HOST:PORT", ExitCode.USAGE)
    parse_endpoint(bind)
    _report(
        apps.run_producer(bind, count=count, size=size, rate=rate, wait_subscriber=wait_subscriber), as_json
    )


@main.command()
@click.argument("target", default="127.0.0.1:7000")
@click.option("--timeout", type=Seconds(0.1), default=60.0, show_default=True)
@click.option("--idle-timeout", type=Seconds(0.1), default=30.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def subscribe(*, target: str, timeout: float, idle_timeout: float, as_json: bool) -> None:
    """ZMQ demo consumer: connect to TARGET (a gateway listener), check and count every message."""
    _report(apps.run_consumer(target, timeout=timeout, idle_timeout=idle_timeout), as_json)


@main.command("iperf-server")
@click.argument("port", type=click.IntRange(1, 65535), default=7000)
@click.option("--bind", default=None, help="Address to listen on.")
@click.option("--forever", is_flag=True, help="Serve many tests (default: exit after one).")
def iperf_server(*, port: int, bind: str | None, forever: bool) -> None:
    """iperf3 server on PORT (foreground)."""
    sys.exit(apps.run_foreground(apps.iperf_server_cmd(port, bind=bind, one_off=not forever)))


@main.command("iperf-client")
@click.argument("target", default="127.0.0.1:7000")
@click.option("--time", "seconds", type=Seconds(0.1), default=10.0, show_default=True)
@click.option(
    "--bytes", "nbytes", type=click.IntRange(0, 2**63 - 1), default=0, help="Send this many bytes instead."
)
@click.option("--parallel", "-P", type=click.IntRange(1, 128), default=1, show_default=True)
@click.option("--reverse", "-R", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def iperf_client(
    *, target: str, seconds: float, nbytes: int, parallel: int, reverse: bool, as_json: bool
) -> None:
    """iperf3 client to TARGET host:port (foreground)."""
    sys.exit(
        apps.run_foreground(
            apps.iperf_client_cmd(
                target, seconds=seconds, nbytes=nbytes, parallel=parallel, reverse=reverse, as_json=as_json
            )
        )
    )


# ------------------------------------------------------------------ run


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def substitute(args: Sequence[str], session: ReadySession) -> list[str]:
    """Fill {listener}, {listeners}, {prod_listener}, {uid}, ... into the command's arguments."""
    first = session.listeners[0] if session.listeners else ""
    host, port = parse_endpoint(first) if first else ("", 0)
    values = {
        "listener": first,
        "listeners": ",".join(session.listeners),
        "listener_host": host,
        "listener_port": str(port) if port else "",
        "prod_listener": session.prod_listeners[0] if session.prod_listeners else "",
        "prod_listeners": ",".join(session.prod_listeners),
        "uid": session.uid,
        "role": session.role,
        "security": session.security,
    }
    # One pass, unknown names left alone: a value is never re-expanded.
    return [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in args]


async def _run(
    *,
    s2cs: str,
    uid: str,
    role: str,
    listen: list[str],
    command: list[str],
    token: str | None,
    link: S2csLink,
    ready_timeout: float,
    release: bool,
) -> int:
    async with link.controller(s2cs, uid, role, token) as ctl:
        await ctl.hello(listen)
        click.echo(f"appctrl: hello sent for {uid}; waiting for the session to be ready", err=True)
        session = await ctl.wait_ready(ready_timeout)
        if not session.prod_listeners and listen:
            session = ReadySession(**{**session.__dict__, "prod_listeners": list(listen)})
        argv = substitute(command, session)
        if argv and argv[0] in TOOLS:
            # One of ours (`-- appctrl subscribe {listener}`): the same install as this
            # appctrl, found whatever PATH is.
            argv = [*tool_argv(argv[0]), *argv[1:]]
        click.echo(f"appctrl: session {uid} is {session.state}; starting: {' '.join(argv)}", err=True)
        try:
            proc = await asyncio.create_subprocess_exec(*argv)
        except OSError as exc:
            raise ControlError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, proc.send_signal, sig)
        try:
            code = await proc.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        click.echo(f"appctrl: {os.path.basename(argv[0])} exited with {code}", err=True)
        if release:
            await ctl.release()
            click.echo(f"appctrl: released {uid}", err=True)
        return code


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--uid", required=True, help="The session id (from s2uc).")
@click.option(
    "--s2cs",
    required=True,
    help="The s2cs of this facility, host:port; the nodes of a gateway of several as "
    "host:port,host:port, tried in order while one answers UNAVAILABLE.",
)
@click.option("--role", default="PROD", show_default=True, help="PROD (producer side) or CONS.")
@click.option("--listen", default="", help="The application's own endpoint(s) HOST:PORT[,...] for the hello.")
@click.option("--token", default=None, envvar=[ENV_PREFIX + "TOKEN"], help="Access token for the s2cs.")
@click.option("--ready-timeout", type=Seconds(0.1), default=300.0, show_default=True)
@click.option(
    "--release/--no-release",
    "release",
    default=False,
    show_default=True,
    help="Release the session when the command exits.",
)
@server_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    *,
    uid: str,
    s2cs: str,
    role: str,
    listen: str,
    token: str | None,
    ready_timeout: float,
    release: bool,
    link: S2csLink,
    command: tuple[str, ...],
) -> None:
    """Hello, wait until the session is ready, then run COMMAND with its endpoints filled in.

    Placeholders: {listener} {listeners} {listener_host} {listener_port}
    {prod_listener} {prod_listeners} {uid} {role} {security}. Example:

      appctrl run --uid U --s2cs gw:5000 --role CONS -- appctrl subscribe {listener}
    """
    check_uid(uid)
    listeners = split_csv(listen)
    for ep in listeners:
        parse_endpoint(ep)
    code = asyncio.run(
        _run(
            s2cs=s2cs,
            uid=uid,
            role=_role(role),
            listen=listeners,
            command=list(command),
            token=token,
            link=link,
            ready_timeout=ready_timeout,
            release=release,
        )
    )
    sys.exit(code)
