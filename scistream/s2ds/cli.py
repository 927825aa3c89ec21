"""`s2ds`: the data-plane daemon of a gateway node, a standalone forwarder, and admin commands."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
import zmq

from scistream import __version__
from scistream.cliutil import Seconds, zmq_reason
from scistream.dataplane import Engine, EngineBase, EngineError, InvalidRoute, Route, RouteInfo
from scistream.endpoints import InvalidEndpoint, parse_endpoint
from scistream.s2ds.client import S2dsClient
from scistream.s2ds.forward import Forwarder, ForwardError, build_tls
from scistream.s2ds.keys import CurveKeyError, keygen, load_keypair, load_public
from scistream.s2ds.knobs import tuning_from_options, tuning_options
from scistream.s2ds.paths import default_control_address
from scistream.s2ds.server import ControlLock, CurveServerConfig, Daemon, DaemonError
from scistream.s2ds.units import parse_rate

log = logging.getLogger("scistream.s2ds")

ENGINE_CHOICE = click.Choice(["native", "pure", "auto"])


class Failure(Exception):
    """Ends a command with one line on stderr and the given exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _make_engine(choice: str | None, options: dict[str, Any]) -> EngineBase:
    tuning = tuning_from_options(options)
    try:
        return Engine(tuning, impl=choice)
    except (ImportError, ValueError) as exc:
        raise Failure(f"cannot start the engine: {exc}") from None


verbose_option = click.option("-v", "--verbose", is_flag=True, help="Log debug detail to stderr.")
engine_option = click.option(
    "--engine",
    type=ENGINE_CHOICE,
    default=None,
    help="Engine implementation: native (C), pure (Python) or auto (native if built) "
    "[$SCISTREAM_ENGINE or auto].",
)
drain_option = click.option(
    "--drain-timeout",
    type=Seconds(0.0),
    default=0.0,
    show_default=True,
    help="On SIGTERM/SIGINT, seconds to let streams in flight finish before cutting them; "
    "0 = as long as they take (a second signal exits at once).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="s2ds")
def cli() -> None:
    """The data-plane daemon of a SciStream gateway node.

    `s2ds serve` hosts the node's engine for s2cs; `s2ds forward` runs one
    forwarding route on its own (e.g. on an HPC compute node); `s2ds ctl`
    inspects a running daemon.
    """


# --- serve ------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--control",
    "address",
    default=None,
    metavar="ADDR",
    help="Control socket: ipc://PATH or tcp://HOST:PORT (tcp needs CURVE keys) "
    "[ipc://<state dir>/s2ds.sock; state dir = $SCISTREAM_STATE_DIR, "
    "/var/lib/scistream as root, else ~/.scistream].",
)
@click.option(
    "--curve-secret-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="The daemon's CURVE key (.key_secret file from `s2ds keygen`).",
)
@click.option(
    "--curve-client-keys",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of admitted clients' CURVE public keys (*.key).",
)
@click.option(
    "--idle-exit",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Exit 0 after this long with no route and no control command (s2cs pings its "
    "daemon twice a second); 0 = never. s2cs starts the daemons it spawns with 60.",
)
@engine_option
@drain_option
@tuning_options
@verbose_option
def serve(
    *,
    address: str | None,
    curve_secret_file: str | None,
    curve_client_keys: str | None,
    idle_exit: float,
    engine: str | None,
    drain_timeout: float,
    verbose: bool,
    **knobs: Any,
) -> None:
    """Host the node's engine and take route commands on the control socket."""
    _setup_logging(verbose)
    address = address or default_control_address()
    if not address.startswith(("ipc://", "tcp://")):
        raise click.UsageError(f"--control {address!r}: use ipc://PATH or tcp://HOST:PORT")
    curve = None
    if curve_secret_file or curve_client_keys:
        if not (curve_secret_file and curve_client_keys):
            raise click.UsageError("CURVE needs both --curve-secret-file and --curve-client-keys")
        curve = CurveServerConfig(curve_secret_file, curve_client_keys)
    elif address.startswith("tcp://"):
        raise click.UsageError(
            "a tcp:// control socket needs CURVE authentication: give --curve-secret-file and "
            "--curve-client-keys (make keys with `s2ds keygen DIR`)"
        )
    if drain_timeout < 0:
        raise click.UsageError("--drain-timeout must not be negative")
    lock = ControlLock(address)
    try:
        lock.acquire()
    except (DaemonError, OSError) as exc:
        raise Failure(str(exc)) from None
    try:
        eng = _make_engine(engine, knobs)
        try:
            code = Daemon(eng, address, curve=curve, drain_timeout=drain_timeout, idle_exit=idle_exit).run()
        except (DaemonError, CurveKeyError) as exc:
            raise Failure(str(exc)) from None
        finally:
            eng.close()
    finally:
        lock.release()
    sys.exit(code)


# --- forward ----------------------------------------------------------------------------


def _endpoint_list(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise click.UsageError("--to needs at least one HOST:PORT")
    for t in items:
        parse_endpoint(t)
    return items


@cli.command()
@click.option(
    "--listen", required=True, metavar="HOST:PORT", help="Where to accept connections (port 0: any)."
)
@click.option(
    "--to",
    "targets",
    required=True,
    metavar="HOST:PORT[,...]",
    help="Target(s); connection k goes to target k mod n.",
)
@click.option(
    "--tls",
    "tls_role",
    type=click.Choice(["server", "client"]),
    default=None,
    help="Which leg speaks TLS: server = accepted connections, client = connections to the "
    "targets. Omitted: plain on both legs.",
)
@click.option(
    "--tls-mode",
    type=click.Choice(["psk", "compat", "cert"]),
    default=None,
    help="psk: TLS 1.3 external PSK (default); compat: SciStream 1.x stunnel (TLS 1.2 PSK; "
    "default with --psk-from-uid); cert: certificate + pinned CA (default with --cert/--ca).",
)
@click.option(
    "--psk-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="stunnel PSKsecrets file of IDENTITY:KEY lines; the first line is used unless "
    "--psk-identity picks one. As in stunnel, a KEY of an even number of hex digits is a hex key.",
)
@click.option(
    "--psk-identity", default="", help="The PSK identity to use from --psk-file (or with --psk-from-uid)."
)
@click.option(
    "--psk-from-uid",
    metavar="UID",
    default=None,
    help="SciStream 1.x: identity client1, key = the session uid without dashes "
    "(read as hex, as a 1.x stunnel does).",
)
@click.option(
    "--cert",
    type=click.Path(dir_okay=False),
    default="",
    help="cert mode: this side's certificate (PEM; a client presents it).",
)
@click.option("--key", type=click.Path(dir_okay=False), default="", help="cert mode: its private key (PEM).")
@click.option(
    "--ca",
    type=click.Path(dir_okay=False),
    default="",
    help="cert mode: the pinned CA (PEM); a server then requires client certificates from it.",
)
@click.option("--server-name", default="", help="cert mode, client: the name to verify (SNI).")
@click.option("--ciphers", default="", help="Cipher list/suites; empty = the mode's secure default.")
@click.option(
    "--rate",
    default="0",
    metavar="RATE",
    help="Cap over all connections and both directions, in bytes/s with decimal units: "
    "500k, 100M, 1G; a bit suffix means bits/s: 10Gbit, 800Mbps; Ki/Mi/Gi are binary. "
    "0 = none.",
)
@click.option("--stats", "show_stats", is_flag=True, help="Print live counters, one line per interval.")
@click.option(
    "--stats-interval",
    type=Seconds(0.01),
    default=1.0,
    show_default=True,
    help="Seconds between --stats lines.",
)
@engine_option
@drain_option
@tuning_options
@verbose_option
def forward(
    *,
    listen: str,
    targets: str,
    tls_role: str | None,
    tls_mode: str | None,
    psk_file: str | None,
    psk_identity: str,
    psk_from_uid: str | None,
    cert: str,
    key: str,
    ca: str,
    server_name: str,
    ciphers: str,
    rate: str,
    show_stats: bool,
    stats_interval: float,
    engine: str | None,
    drain_timeout: float,
    verbose: bool,
    **knobs: Any,
) -> None:
    """Forward connections from --listen to --to until SIGTERM/Ctrl-C (which drain and exit 0).

    \b
    Examples:
      s2ds forward --listen 0.0.0.0:5100 --to 10.0.0.5:5074
      s2ds forward --listen 127.0.0.1:5074 --to gw.example.org:5100 \\
                   --tls client --psk-file psk.txt --rate 1G --stats
    """
    _setup_logging(verbose)
    try:
        parse_endpoint(listen, allow_port_zero=True)
        to = _endpoint_list(targets)
        rate_limit = parse_rate(rate)
        tls = build_tls(
            tls_role,
            tls_mode,
            psk_file=psk_file,
            psk_from_uid=psk_from_uid,
            psk_identity=psk_identity,
            cert=cert,
            key=key,
            ca=ca,
            server_name=server_name,
            ciphers=ciphers,
        )
        route = Route(route_id="forward", listen=listen, targets=to, tls=tls, rate_limit=rate_limit)
    except (ForwardError, InvalidRoute, InvalidEndpoint, ValueError) as exc:
        raise Failure(str(exc), 2) from None
    if show_stats and stats_interval <= 0:
        raise click.UsageError("--stats-interval must be positive")
    if drain_timeout < 0:
        raise click.UsageError("--drain-timeout must not be negative")
    eng = _make_engine(engine, knobs)
    try:
        fwd = Forwarder(
            eng,
            route,
            echo=click.echo,
            stats_interval=stats_interval if show_stats else 0.0,
            drain_timeout=drain_timeout,
        )
        try:
            code = fwd.run()
        except EngineError as exc:
            raise Failure(str(exc)) from None
    finally:
        eng.close()
    sys.exit(code)


# --- keygen -----------------------------------------------------------------------------


@cli.command("keygen")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--name",
    "names",
    multiple=True,
    default=("server", "client"),
    show_default=True,
    help="Keypair names (repeatable): NAME.key (public) and NAME.key_secret, mode 0600.",
)
def keygen_cmd(directory: str, names: tuple[str, ...]) -> None:
    """Make CURVE keypairs for a tcp:// control socket.

    Run the daemon with --curve-secret-file DIR/server.key_secret and
    --curve-client-keys pointing at a directory holding client.key; give
    clients server.key and their own client.key_secret.
    """
    try:
        for path in keygen(directory, names):
            click.echo(str(path))
    except (CurveKeyError, OSError) as exc:
        raise Failure(str(exc)) from None


# --- ctl --------------------------------------------------------------------------------


@cli.group()
@click.option(
    "--control",
    "address",
    default=None,
    metavar="ADDR",
    help="The daemon's control socket [ipc://<state dir>/s2ds.sock].",
)
@click.option(
    "--curve-server-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="tcp://: the daemon's public key file (server.key).",
)
@click.option(
    "--curve-client-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="tcp://: this client's key file (client.key_secret).",
)
@click.option(
    "--timeout", type=Seconds(0.01), default=5.0, show_default=True, help="Seconds to wait for an answer."
)
@click.pass_context
def ctl(
    ctx: click.Context,
    address: str | None,
    curve_server_key: str | None,
    curve_client_key: str | None,
    timeout: float,
) -> None:
    """Ask a running s2ds about its routes (JSON on stdout)."""
    address = address or default_control_address()
    if not address.startswith(("ipc://", "tcp://")) or address in ("ipc://", "tcp://"):
        raise click.UsageError(f"--control {address!r}: use ipc://PATH or tcp://HOST:PORT")
    ctx.obj = {
        "address": address,
        "server_key": curve_server_key,
        "client_key": curve_client_key,
        "timeout": timeout,
    }


def _run_client(obj: dict[str, Any], call: Callable[[S2dsClient], Awaitable[Any]]) -> Any:
    server_public = keys = None
    try:
        if obj["server_key"] or obj["client_key"]:
            if not (obj["server_key"] and obj["client_key"]):
                raise click.UsageError("CURVE needs both --curve-server-key and --curve-client-key")
            server_public = load_public(obj["server_key"])
            keys = load_keypair(obj["client_key"])
        client = S2dsClient(
            obj["address"], curve_server_public=server_public, curve_keys=keys, timeout=obj["timeout"]
        )
    except (CurveKeyError, ValueError) as exc:
        raise Failure(str(exc), 2) from None

    async def go() -> Any:
        async with client:
            return await call(client)

    try:
        return asyncio.run(go())
    except EngineError as exc:
        raise Failure(str(exc)) from None
    except zmq.ZMQError as exc:  # e.g. a tcp:// host that does not resolve
        raise Failure(f"cannot use the control socket {obj['address']}: {zmq_reason(exc)}") from None


def route_info_json(info: RouteInfo) -> dict[str, Any]:
    """A route for people and scripts; never contains a key."""
    r = info.route
    tls = None
    if r.tls is not None:
        tls = {"role": r.tls.role.value, "mode": r.tls.mode.value, "psk_identity": r.tls.psk_identity}
    return {
        "route_id": r.route_id,
        "listen": r.listen,
        "bound": info.bound,
        "targets": list(r.targets),
        "tls": tls,
        "rate_limit": r.rate_limit,
        "max_connections": r.max_connections,
        "labels": dict(r.labels),
    }


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


@ctl.command("ping")
@click.pass_obj
def ctl_ping(obj: dict[str, Any]) -> None:
    """Version, engine and pid of the daemon."""
    _echo_json(_run_client(obj, lambda c: c.ping()))


@ctl.command("list")
@click.pass_obj
def ctl_list(obj: dict[str, Any]) -> None:
    """Every route (keys are never shown)."""
    infos = _run_client(obj, lambda c: c.routes())
    _echo_json([route_info_json(i) for i in infos])


@ctl.command("stats")
@click.argument("route_id", required=False)
@click.option("--connections", is_flag=True, help="Include one entry per live connection.")
@click.pass_obj
def ctl_stats(obj: dict[str, Any], route_id: str | None, connections: bool) -> None:
    """Counters of every route, or of ROUTE_ID."""
    stats = _run_client(obj, lambda c: c.stats(route_id, connections))
    _echo_json(dataclasses.asdict(stats))


@ctl.command("remove")
@click.argument("route_id")
@click.option("--drain", is_flag=True, help="Let the route's connections finish by themselves.")
@click.pass_obj
def ctl_remove(obj: dict[str, Any], route_id: str, drain: bool) -> None:
    """Remove one route."""
    _run_client(obj, lambda c: c.remove_route(route_id, drain))
    _echo_json({"removed": route_id})


# --- entry point ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure is one line on stderr and a non-zero exit."""
    try:
        rv = cli.main(args=argv, prog_name="s2ds", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"s2ds: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("s2ds: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"s2ds: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except Failure as exc:
        click.echo(f"s2ds: error: {exc}", err=True)
        sys.exit(exc.code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
