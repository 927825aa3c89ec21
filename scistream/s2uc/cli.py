"""``s2uc``: the SciStream user client (1.x command lines, plus stream/status/list).

Every subcommand answers to its dash and underscore spelling; every failure
is one line on stderr and a non-zero exit code (see grpcutil.ExitCode).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from scistream import __version__
from scistream.cliutil import (
    INT32_MAX,
    BothSpellingsGroup,
    Seconds,
    ToolError,
    bundle_options,
    s2cs_tls_options,
)
from scistream.grpcutil import ControlError, ExitCode, check_uid, port_list, split_csv
from scistream.s2uc import flows, output, tokens
from scistream.s2uc.config import ENV_PREFIX, S2ucConfig, load_config
from scistream.s2uc.store import (
    SessionRecord,
    SessionStore,
    check_key_file_writable,
    read_key_file,
    write_key_file,
)

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_RECEIVER_PORTS = "5074,5075,5076,37000,47000"
SECURITY_MODES = ("tls", "plain", "compat")
MAX_NUM_CONN = 64  # s2cs's ServerConfig.max_num_conn
MAX_RATE_LIMIT = 2**63 - 1  # an int64 on the wire


class S2ucError(ToolError):
    """A ControlError on its way out: one line, its own exit code."""

    tool = "s2uc"


class S2ucGroup(BothSpellingsGroup):
    """Accepts ``inbound_request`` for ``inbound-request``; turns ControlError into one line."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        _, cmd, rest = super().resolve_command(ctx, args)
        # The canonical name, so per-command config sections apply to both spellings.
        return (cmd.name if cmd else None), cmd, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ControlError as exc:
            raise S2ucError(exc.message, exc.exit_code) from None
        except KeyboardInterrupt:
            raise S2ucError("interrupted", 130) from None


def _env(name: str) -> list[str]:
    return [ENV_PREFIX + name]


def _config(ctx: click.Context) -> S2ucConfig:
    cfg = ctx.find_object(S2ucConfig)
    return cfg if cfg is not None else S2ucConfig()


# ---------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Connection:
    """How to reach an s2cs: the options of connection_options but --s2cs and --json."""

    server_cert: str
    ssl: bool
    timeout: float | None
    scope: str | None

    def target(self, ctx: click.Context, address: str) -> flows.Target:
        scope_id = self.scope or _config(ctx).scope_for(address)
        return flows.Target(
            address=address,
            server_cert=self.server_cert,
            ssl=self.ssl,
            token=tokens.access_token(scope_id),
            timeout=self.timeout,
        )


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """What a req asks for: the options of request_options, parsed and checked."""

    num_conn: int
    rate: int
    rate_limit: int  # bytes/s, 0 = none
    security: str  # lowercased; "" = the s2cs's default
    hello: list[str] | None  # the endpoints s2uc says hello with itself (--remote_ip), else None
    mock: bool
    key_file: str | None


def _connection(
    *, server_cert: str, ssl: bool, no_ssl: bool, timeout: float | None, scope: str | None
) -> Connection:
    return Connection(server_cert=server_cert, ssl=ssl and not no_ssl, timeout=timeout, scope=scope)


def connection_options(default_s2cs: str | None, *, multiple: bool = False) -> Callable[[F], F]:
    """The options every command that talks to an s2cs takes, passed on as ``conn``
    (a Connection) beside ``s2cs`` and ``as_json``; no --s2cs when default_s2cs is None."""

    def deco(f: F) -> F:
        f = bundle_options("conn", _connection, ("server_cert", "ssl", "no_ssl", "timeout", "scope"))(f)
        s2cs_opt = click.option(
            "--s2cs",
            "s2cs",
            default=() if multiple else default_s2cs,
            multiple=multiple,
            envvar=_env("S2CS"),
            show_default=not multiple,
            help="Control server host:port"
            + (" (repeatable: one per side)" if multiple else "")
            + "; the nodes of a gateway of several as host:port,host:port, tried in order "
            "while one answers UNAVAILABLE.",
        )
        opts = [
            *s2cs_tls_options(ENV_PREFIX, "The s2cs certificate (or its CA) to pin as the only trust root."),
            click.option(
                "--timeout",
                type=Seconds(0.1),
                default=None,
                envvar=_env("TIMEOUT"),
                help="Deadline per call in seconds [default: 190 for req, 15 otherwise].",
            ),
            click.option(
                "--scope",
                default=None,
                envvar=_env("SCOPE"),
                help="Globus scope id to authenticate with [default: from [scopes] in s2uc.toml].",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text."),
        ]
        if default_s2cs is not None or multiple:
            opts.insert(0, s2cs_opt)
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


def _request_settings(
    *,
    num_conn: int,
    rate: int,
    rate_limit: str | None,
    security: str | None,
    receiver_ports: str,
    remote_ip: str | None,
    mock: bool,
    key_file: str | None,
) -> RequestSettings:
    return RequestSettings(
        num_conn=num_conn,
        rate=rate,
        rate_limit=parse_rate_limit(rate_limit),
        security=(security or "").lower(),
        hello=flows.expand_endpoints(remote_ip, _receiver_ports(receiver_ports)) if remote_ip else None,
        mock=mock,
        key_file=key_file,
    )


def request_options(f: F) -> F:
    """The options of a req (inbound/outbound/stream), passed on as ``req`` (RequestSettings)."""
    f = bundle_options(
        "req",
        _request_settings,
        ("num_conn", "rate", "rate_limit", "security", "receiver_ports", "remote_ip", "mock", "key_file"),
    )(f)
    opts = [
        click.option(
            "--num_conn",
            "--num-conn",
            "num_conn",
            # An s2cs of this release serves at most MAX_NUM_CONN per session (fewer when its
            # port range is smaller): refused here, before any hello is sent.
            type=click.IntRange(1, MAX_NUM_CONN),
            default=5,
            show_default=True,
            envvar=_env("NUM_CONN"),
            help=f"Parallel connections (listeners), at most {MAX_NUM_CONN}.",
        ),
        click.option(
            "--rate",
            type=click.IntRange(0, INT32_MAX),  # an int32 on the wire
            default=10000,
            show_default=True,
            help="1.x rate field: stored by the s2cs, not enforced (see --rate-limit).",
        ),
        click.option(
            "--rate-limit",
            "--rate_limit",
            "rate_limit",
            default=None,
            envvar=_env("RATE_LIMIT"),
            help="Enforced data-rate cap in bytes/s (suffix K, M, G: powers of 1000).",
        ),
        click.option(
            "--security",
            type=click.Choice(SECURITY_MODES, case_sensitive=False),
            default=None,
            envvar=_env("SECURITY"),
            help="WAN leg: tls (encrypted, per-session key), plain, or compat (1.x stunnel).",
        ),
        click.option(
            "--receiver_ports",
            "--receiver-ports",
            "receiver_ports",
            default=DEFAULT_RECEIVER_PORTS,
            show_default=True,
            help="Application ports for the hello, with --remote_ip.",
        ),
        click.option(
            "--remote_ip",
            "--remote-ip",
            "remote_ip",
            default=None,
            help="Application host: s2uc sends the hello itself (remote_ip:receiver_ports).",
        ),
        click.option(
            "--mock",
            type=click.BOOL,
            default=False,
            show_default=True,
            help=f"Use the fixed uid {flows.MOCK_UID} (1.x: --mock True).",
        ),
        click.option(
            "--key-file",
            "--key_file",
            "key_file",
            default=None,
            envvar=_env("KEY_FILE"),
            type=click.Path(dir_okay=False),
            help="Data-channel key file (hex): written by inbound, read by outbound requests.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _receiver_ports(text: str) -> list[int]:
    return port_list(text, "--receiver_ports", required=True)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:b(?:ytes?)?(?:/s)?)?\s*$", re.IGNORECASE)


def parse_rate_limit(text: str | None) -> int:
    if text is None or str(text).strip() in ("", "0"):
        return 0
    m = _RATE.match(str(text))
    if not m:
        raise ControlError(f"--rate-limit {text!r} is not a rate in bytes/s (e.g. 500M)", ExitCode.USAGE)
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value > MAX_RATE_LIMIT:
        raise ControlError(
            f"--rate-limit {text!r} is larger than any link (at most {MAX_RATE_LIMIT} bytes/s)",
            ExitCode.USAGE,
        )
    if value == 0:
        raise ControlError(f"--rate-limit {text!r} is below 1 byte/s (0 means no limit)", ExitCode.USAGE)
    return value


def _progress(as_json: bool) -> flows.Progress:
    if as_json:
        return lambda line: log.debug("%s", line)
    return click.echo


def _note(text: str) -> None:
    click.echo(f"s2uc: note: {text}", err=True)


# ---------------------------------------------------------------- group


@click.group(cls=S2ucGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="s2uc")
@click.option("-v", "--verbose", "--v", is_flag=True, help="Log debug detail to stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """SciStream user client: reserve, connect, inspect and release streams between facilities."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config()
    ctx.obj = cfg
    defaults = cfg.default_map(list(main.commands))
    for name, values in defaults.items():
        if isinstance(values.get("s2cs"), str) and name == "release":
            values["s2cs"] = [values["s2cs"]]  # release takes several
        if name == "stream":
            values.pop("s2cs", None)  # stream names its two sides itself
    ctx.default_map = defaults


# ---------------------------------------------------------------- auth


@main.command()
@click.option(
    "--scope",
    default=tokens.DEFAULT_SCOPE,
    envvar=_env("SCOPE"),
    show_default=True,
    help="Globus scope id of the s2cs (its Globus client id).",
)
@click.option("--force", is_flag=True, help="Log in again even if a login for the scope exists.")
def login(scope: str, force: bool) -> None:
    """Log in with Globus (prints a URL, then reads the authorization code)."""
    store = tokens.TokenStore()
    if store.get(scope) and not force:
        click.echo("You are already logged in, to try different credentials please log out!")
        return
    click.echo(
        "To obtain token for the scope, please open the URL in your browser and follow the instructions"
    )

    def read_code(url: str) -> str:
        prompt = "Please authenticate with Globus here"
        click.echo(f"{prompt}:\n{'-' * len(prompt)}\n{url}\n{'-' * len(prompt)}\n")
        return str(click.prompt("Enter the resulting Authorization Code here"))

    tokens.login(scope, read_code, store)
    click.echo(f"Logged in for scope {scope}; tokens saved in {store.path}")


@main.command()
def logout() -> None:
    """Revoke the stored Globus tokens and delete them."""
    tokens.logout()
    click.echo("Successfully logged out!")


@main.command("check-auth")
@click.option(
    "--scope", default=None, envvar=_env("SCOPE"), help="Scope id [default: the 1.x default scope]."
)
@click.option("--ip", default=None, help="An s2cs address: use its scope from [scopes] in s2uc.toml.")
@click.option(
    "--show-token", "--show_token", "show_token", is_flag=True, help="Print the access token itself."
)
@click.pass_context
def check_auth(ctx: click.Context, scope: str | None, ip: str | None, show_token: bool) -> None:
    """Show whether a valid Globus login exists for a scope."""
    if ip and not scope:
        scope = _config(ctx).scope_for(ip)
        if not scope:
            raise ControlError(f"no scope configured for {ip} ([scopes] in s2uc.toml)", ExitCode.USAGE)
    scope = scope or tokens.DEFAULT_SCOPE
    token = tokens.access_token(scope)
    if show_token:
        click.echo(f"Access Token for scope '{scope}': {token}")
        return
    tok = tokens.TokenStore().get(scope) or {}
    left = (tok.get("expires_at_seconds") or 0) - time.time()
    click.echo(f"Logged in for scope '{scope}' (access token valid for {max(left, 0) / 60:.0f} more minutes)")


# ---------------------------------------------------------------- requests


def _producer(
    ctx: click.Context, *, s2cs: str, conn: Connection, as_json: bool, req: RequestSettings, style: str
) -> None:
    if req.key_file:
        check_key_file_writable(req.key_file)
    target = conn.target(ctx, s2cs)
    uid = flows.new_uid(req.mock)
    if not as_json:
        output.header(uid, s2cs, target.token, "PROD")
    side = flows.producer_side(
        target,
        uid,
        num_conn=req.num_conn,
        rate=req.rate,
        security=req.security,
        rate_limit=req.rate_limit,
        hello_endpoints=req.hello,
        progress=_progress(as_json),
    )
    store = SessionStore()
    flows.remember(store, side)
    key_file = req.key_file
    if key_file and side.session_key:
        write_key_file(key_file, side.session_key)
    if as_json:
        output.echo_json(side.as_dict())
    elif style == "prod-req":
        output.pb_text_lines("listeners", side.listeners)
        output.pb_text_lines("prod_listeners", side.prod_listeners)
        click.echo(f"Listeners: {side.listeners!r}")
    else:
        output.pb_text_lines("listeners", side.listeners)
    if side.session_key is None:
        if not side.extensions:
            _note(
                f"the s2cs at {s2cs} returned no data-channel key (SciStream 1.x?): "
                "its WAN leg uses 1.x stunnel settings, which neither encrypt nor authenticate"
            )
        elif key_file:
            _note(f"no data-channel key for a '{side.security}' session: {key_file} not written")


def _consumer(
    ctx: click.Context,
    *,
    uid: str,
    remote: Sequence[str],
    s2cs: str,
    conn: Connection,
    as_json: bool,
    req: RequestSettings,
) -> None:
    if req.mock:
        uid = flows.MOCK_UID
    check_uid(uid)
    store = SessionStore()
    record = store.get(uid)
    if not remote and record and record.listeners.get("PROD"):
        # The producer side was set up by this s2uc: its listeners are the targets.
        remote = record.listeners["PROD"]
    if not remote:
        raise ControlError(f"give the inbound gateway's listener(s) after the uid {uid}", ExitCode.USAGE)
    endpoints = flows.check_endpoints(split_csv(list(remote)), "remote endpoint")
    key = read_key_file(req.key_file) if req.key_file else (record.key_bytes if record else None)
    mode = (req.security or (record.security if record else "")).lower()
    if key is None and mode not in ("plain", "compat"):
        where = "in the session store" if record is None else "recorded for it"
        _note(
            f"no data-channel key for {uid} {where} (give --key-file): the consumer s2cs can only "
            "connect to a 1.x/compat or plain producer side, or to gateways that authenticate "
            "each other by gateway certificate"
        )
    target = conn.target(ctx, s2cs)
    if not as_json:
        output.header(uid, s2cs, target.token, "CONS")
    side = flows.consumer_side(
        target,
        uid,
        endpoints,
        num_conn=req.num_conn,
        rate=req.rate,
        security=mode,
        rate_limit=req.rate_limit,
        session_key=key,
        hello_endpoints=req.hello,
        progress=_progress(as_json),
    )
    flows.remember(store, side)
    if as_json:
        output.echo_json(side.as_dict())
    else:
        output.pb_text_lines("listeners", side.listeners)


@main.command("inbound-request")
@connection_options("localhost:5000")
@request_options
@click.pass_context
def inbound_request(ctx: click.Context, **kw: Any) -> None:
    """Producer side: reserve the inbound proxy; with --remote_ip also send the hello."""
    _producer(ctx, style="inbound", **kw)


@main.command("prod-req")
@connection_options("localhost:5000")
@request_options
@click.pass_context
def prod_req(ctx: click.Context, **kw: Any) -> None:
    """Producer side; waits for the application controller's hello (appctrl mock)."""
    _producer(ctx, style="prod-req", **kw)


@main.command("outbound-request")
@connection_options("localhost:6000")
@request_options
@click.argument("uid")
@click.argument("remote", nargs=-1)
@click.pass_context
def outbound_request(ctx: click.Context, **kw: Any) -> None:
    """Consumer side: UID REMOTE... (the inbound proxy's listeners); with --remote_ip also the hello."""
    _consumer(ctx, **kw)


@main.command("cons-req")
@connection_options("localhost:6000")
@request_options
@click.argument("uid")
@click.argument("remote", nargs=-1)
@click.pass_context
def cons_req(ctx: click.Context, **kw: Any) -> None:
    """Consumer side: UID PROD_LISTENER...; waits for the application controller's hello."""
    _consumer(ctx, **kw)


@main.command()
@click.option(
    "--prod-s2cs",
    "--producer-s2cs",
    "--prod_s2cs",
    "--producer_s2cs",
    "prod_s2cs",
    default="localhost:5000",
    show_default=True,
    envvar=_env("PROD_S2CS"),
    help="The producer facility's s2cs (host:port, or its nodes host:port,host:port).",
)
@click.option(
    "--cons-s2cs",
    "--consumer-s2cs",
    "--cons_s2cs",
    "--consumer_s2cs",
    "cons_s2cs",
    default="localhost:6000",
    show_default=True,
    envvar=_env("CONS_S2CS"),
    help="The consumer facility's s2cs (host:port, or its nodes host:port,host:port).",
)
@click.option(
    "--producer",
    "producer",
    multiple=True,
    help="Producer application endpoint(s) host:port (repeatable or a,b); s2uc sends the hellos.",
)
@click.option(
    "--appctrl",
    "wait_appctrl",
    is_flag=True,
    help="Send no hellos: wait for application controllers (appctrl) on both sides.",
)
@click.option("--uid", default=None, help="Session id [default: a new uuid1].")
@click.option("--prod-server-cert", "prod_server_cert", default=None, help="Pin for the producer s2cs.")
@click.option("--cons-server-cert", "cons_server_cert", default=None, help="Pin for the consumer s2cs.")
@connection_options(None)
@request_options
@click.pass_context
def stream(
    ctx: click.Context,
    *,
    prod_s2cs: str,
    cons_s2cs: str,
    producer: tuple[str, ...],
    wait_appctrl: bool,
    uid: str | None,
    prod_server_cert: str | None,
    cons_server_cert: str | None,
    conn: Connection,
    as_json: bool,
    req: RequestSettings,
) -> None:
    """Both sides in one go: inbound on the producer's s2cs, outbound on the consumer's, same uid.

    The data-channel key goes from one s2cs to the other in memory. Prints where
    the consumer application should connect. Undo with `s2uc release UID`.
    """
    if producer:
        prod_eps: list[str] | None = flows.check_endpoints(split_csv(list(producer)), "--producer")
    elif req.hello is not None:
        prod_eps = req.hello
    elif wait_appctrl:
        prod_eps = None
    else:
        raise ControlError(
            "stream needs the producer endpoint(s): --producer HOST:PORT "
            "(or --remote_ip, or --appctrl to wait for appctrl hellos)",
            ExitCode.USAGE,
        )
    sid = check_uid(uid or flows.new_uid(req.mock))
    if req.key_file:
        check_key_file_writable(req.key_file)
    pt = dataclasses.replace(conn, server_cert=prod_server_cert or conn.server_cert).target(ctx, prod_s2cs)
    ct = dataclasses.replace(conn, server_cert=cons_server_cert or conn.server_cert).target(ctx, cons_s2cs)
    progress = _progress(True)  # the 1.x chatter would interleave two sides: keep it in the log
    prod = flows.producer_side(
        pt,
        sid,
        num_conn=req.num_conn,
        rate=req.rate,
        security=req.security,
        rate_limit=req.rate_limit,
        hello_endpoints=prod_eps,
        progress=progress,
    )
    store = SessionStore()
    flows.remember(store, prod)
    try:
        cons = flows.consumer_side(
            ct,
            sid,
            prod.listeners,
            num_conn=req.num_conn,
            rate=req.rate,
            security=prod.security,
            rate_limit=req.rate_limit,
            session_key=prod.session_key,
            hello_endpoints=None if wait_appctrl else [],
            hello_role="CONS",
            progress=progress,
        )
    except ControlError as exc:
        flows.rollback(pt, sid)
        store.delete(sid)
        raise ControlError(
            f"consumer side failed, producer side released: {exc.message}", exc.exit_code
        ) from None
    flows.remember(store, cons)
    if req.key_file and prod.session_key:
        write_key_file(req.key_file, prod.session_key)
    if as_json:
        output.echo_json(
            {
                "uid": sid,
                "security": prod.security or None,
                "producer": prod.as_dict(),
                "consumer": cons.as_dict(),
                "connect": cons.listeners,
            }
        )
        return
    click.echo(f"uid: {sid}")
    click.echo(f"security: {prod.security or 'unknown (SciStream 1.x producer side)'}")
    click.echo(
        f"producer side ({prod_s2cs}): {', '.join(prod.listeners)} -> {', '.join(prod.prod_listeners)}"
    )
    click.echo(f"consumer side ({cons_s2cs}): {', '.join(cons.listeners)} -> {', '.join(prod.listeners)}")
    click.echo(f"consumer connects to: {', '.join(cons.listeners)}")
    click.echo(f"release both sides: s2uc release {sid}")
    if prod.session_key is None and prod.security not in ("plain", "compat"):
        _note("no data-channel key came back: the producer s2cs speaks SciStream 1.x")


@main.command()
@click.argument("uid")
@click.option("--producer-s2cs", "--producer_s2cs", "producer_s2cs", default=None, help="1.x spelling.")
@click.option("--consumer-s2cs", "--consumer_s2cs", "consumer_s2cs", default=None, help="1.x spelling.")
@connection_options(None, multiple=True)
@click.pass_context
def release(
    ctx: click.Context,
    *,
    uid: str,
    producer_s2cs: str | None,
    consumer_s2cs: str | None,
    s2cs: tuple[str, ...],
    conn: Connection,
    as_json: bool,
) -> None:
    """Release UID on one or more s2cs (--s2cs repeatable; default: the sides s2uc recorded)."""
    store = SessionStore()
    record = store.get(uid)
    # One --s2cs per side; a comma list in one is the nodes of that side's gateway.
    addresses = [a.strip() for a in (*s2cs, producer_s2cs, consumer_s2cs) if a and a.strip()]
    if not addresses:
        addresses = (
            list(dict.fromkeys(record.sides.values())) if record and record.sides else ["localhost:5000"]
        )
    targets = [conn.target(ctx, a) for a in addresses]
    outcomes = flows.release(targets, uid)
    ok = all(o.ok for o in outcomes)
    if record is not None and ok:
        store.delete(uid)
    elif record is not None:
        for o in outcomes:
            if o.ok:
                record.sides = {r: a for r, a in record.sides.items() if a != o.s2cs}
        store.put(record)
    if as_json:
        output.echo_json({"uid": uid, "results": [o.__dict__ for o in outcomes]})
    else:
        for o in outcomes:
            if o.ok:
                click.echo(f"Release completed: {uid} on {o.s2cs}")
    if not ok:
        bad = [o for o in outcomes if not o.ok]
        codes = {o.exit_code for o in bad}
        raise ControlError(
            "; ".join(o.message for o in bad), codes.pop() if len(codes) == 1 else ExitCode.FAILURE
        )


@main.command("check-status")
@click.argument("uid", required=False, default="")
@click.option("--watch", is_flag=True, help="Refresh a live table until Ctrl-C.")
@click.option("--interval", type=Seconds(0.1), default=1.0, show_default=True)
@connection_options("localhost:5000")
@click.pass_context
def check_status(
    ctx: click.Context,
    *,
    uid: str,
    watch: bool,
    interval: float,
    s2cs: str,
    conn: Connection,
    as_json: bool,
) -> None:
    """State, endpoints, bytes and rates of UID (or of every session you may see)."""
    _show_status(
        ctx,
        uid=uid,
        watch=watch,
        interval=interval,
        s2cs=s2cs,
        conn=conn,
        as_json=as_json,
    )


@main.command("list")
@click.option("--local", is_flag=True, help="List the sessions in the local session store instead.")
@click.option("--watch", is_flag=True, help="Refresh a live table until Ctrl-C.")
@click.option("--interval", type=Seconds(0.1), default=1.0, show_default=True)
@connection_options("localhost:5000")
@click.pass_context
def list_(
    ctx: click.Context,
    *,
    local: bool,
    watch: bool,
    interval: float,
    s2cs: str,
    conn: Connection,
    as_json: bool,
) -> None:
    """Sessions on an s2cs (or, with --local, the ones this user's s2uc remembers)."""
    if local:
        records = SessionStore().all()
        if as_json:
            output.echo_json([_record_dict(r) for r in records])
            return
        for r in records:
            sides = ", ".join(f"{role}@{addr}" for role, addr in r.sides.items())
            click.echo(
                f"{r.uid}  {sides}  security={r.security or '-'}  key={'yes' if r.session_key else 'no'}"
            )
        return
    _show_status(
        ctx,
        uid="",
        watch=watch,
        interval=interval,
        s2cs=s2cs,
        conn=conn,
        as_json=as_json,
    )


def _record_dict(r: SessionRecord) -> dict[str, Any]:
    return {
        "uid": r.uid,
        "sides": r.sides,
        "listeners": r.listeners,
        "prod_listeners": r.prod_listeners,
        "security": r.security,
        "has_session_key": bool(r.session_key),
        "created": r.created,
    }


def _show_status(
    ctx: click.Context,
    *,
    uid: str,
    watch: bool,
    interval: float,
    s2cs: str,
    conn: Connection,
    as_json: bool,
) -> None:
    from rich.console import Console, Group

    addresses = [s2cs]
    record = SessionStore().get(uid) if uid else None
    if record and record.sides and ctx.get_parameter_source("s2cs") == click.core.ParameterSource.DEFAULT:
        # A session s2uc set up itself: show every side it recorded.
        addresses = list(dict.fromkeys(record.sides.values()))
    targets = [conn.target(ctx, a) for a in addresses]

    def snapshot() -> list[tuple[str, list[Any]]]:
        return [(t.address, flows.status(t, uid)) for t in targets]

    snap = snapshot()  # the first call's errors end the command
    console = Console(file=sys.stdout, soft_wrap=not watch)
    if as_json and not watch:
        output.echo_json([{**output.session_dict(s), "s2cs": addr} for addr, ss in snap for s in ss])
        return
    if not watch:
        for addr, sessions in snap:
            if not sessions:
                click.echo(f"no sessions on {addr}")
            elif console.is_terminal:
                console.print(output.status_view(sessions, addr))
            else:
                for line in output.status_lines(sessions):
                    click.echo(f"{line}  ({addr})" if not line.startswith(" ") else line)
        return
    from rich.live import Live
    from rich.text import Text

    def view(current: list[tuple[str, list[Any]]]) -> Group:
        return Group(*[output.status_view(ss, addr) for addr, ss in current])

    try:
        with Live(view(snap), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                try:
                    live.update(view(snapshot()))
                except ControlError as exc:
                    # Keep watching through a restart of the s2cs; say what is wrong meanwhile.
                    live.update(Text(f"{exc.message} (retrying every {interval:g} s)", style="red"))
    except KeyboardInterrupt:
        return


def run() -> None:  # pragma: no cover - console_scripts entry for `python -m`
    main(prog_name="s2uc")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
