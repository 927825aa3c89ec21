"""``s2cs``: the SciStream control server command line.

Every option spelling SciStream 1.x users type works (``--listener_ip`` and
``--listener-ip``, ``--type``/``-t`` in any case, ``--v``/``--verbose``,
``--ssl False``...). Settings come from, in rising priority: built-in defaults,
a TOML file (``--config``; top-level keys or an ``[s2cs]`` table, named like the
options with underscores), ``SCISTREAM_<OPTION>`` environment variables (e.g.
``SCISTREAM_LISTENER_IP``, ``SCISTREAM_CLIENT_SECRET``), then the command line.
Backend settings (``--backend-option KEY=VALUE``, a ``[backend_options]`` table,
``SCISTREAM_BACKEND_OPTION``) are merged per key in the same order; the backend
refuses a key it does not read (backends/base.py ``known_settings``).

Defaults that differ from 1.x, and why:

* ``--listener_ip`` is 127.0.0.1: listeners are advertised at this address, so a
  real deployment names its reachable address (every tutorial does); 1.x's
  0.0.0.0 advertised an address no peer can connect to, and is refused at startup
  (as are :: and an empty address).
* ``--type`` is ``native`` (our data plane); the 1.x names still work.
* ``--security`` is ``tls`` (a random per-session key, real encryption);
  ``--scistream1-compat`` is the explicit 1.x interoperability mode.
* 1.x ``rate`` is stored, not enforced; ``--enforce-rate`` reads it as kB/s
  (rate x 1000 bytes/s). A request's ``rate_limit`` (bytes/s) is always enforced.
* ``--metrics-port`` is off unless given (0 = an ephemeral port); metrics bind to
  127.0.0.1. Events are on, on an ipc socket in the state directory that only
  this user can open (advertised by ``server_info``); a tcp:// events address
  needs CURVE keys (1.x had no events; an unauthenticated TCP port let every
  local user read every session's uid and endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import tomllib
from collections.abc import Mapping
from typing import Any

import click

from scistream import __version__
from scistream.clienttext import EscapingFormatter
from scistream.cliutil import Seconds
from scistream.endpoints import InvalidEndpoint, parse_endpoint, parse_port_range, url_uses_tls
from scistream.s2cs.backends import BACKENDS, backend_names
from scistream.s2cs.config import (
    DEFAULT_CLIENT_ID,
    NODE_NAME,
    PLACEMENTS,
    SECURITY_MODES,
    ServerConfig,
    default_node_name,
    default_state_dir,
)

log = logging.getLogger("scistream.s2cs")

#: Option defaults come from ServerConfig (the one place they are defined); state_dir
#: is derived from the port, so a placeholder is enough here.
_DEFAULTS = ServerConfig(state_dir="-")
MIN_NODE_TTL, MAX_NODE_TTL = 2.0, 300.0  # s: below 2 a busy node loses its lease to GC pauses
_SECRET_FROM_ENV = "\0from-env"  # --client-secret given with no value (the VM tutorial)
_FILE_BACKEND_OPTIONS = "scistream.s2cs.file_backend_options"  # ctx.meta: the config file's
BACKEND_OPTION_ENV = "SCISTREAM_BACKEND_OPTION"  # KEY=VALUE words, shell-quoted


def parse_backend_option(text: str, origin: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value); dashes in the key read as underscores."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise click.UsageError(
            f"{origin} {text!r} is not KEY=VALUE (e.g. tls_cert=/etc/scistream/gateway.pem)"
        )
    return key, value


def _file_backend_options(path: str, table: dict[str, Any], data: dict[str, Any]) -> dict[str, str]:
    """Take the backend options out of a config file: a ``[backend_options]`` table (top
    level, or ``[s2cs.backend_options]``) or a ``backend_option = ["KEY=VALUE", ...]`` list."""
    found: list[tuple[str, Any]] = []
    for name in ("backend_options", "backend-options", "backend_option", "backend-option"):
        if name in table:
            found.append((name, table.pop(name)))
        if table is not data and name in data:
            found.append((name, data[name]))
    if not found:
        return {}
    if len(found) > 1:
        raise click.BadParameter(f"{path}: give the backend options once (one [backend_options] table)")
    name, value = found[0]
    options: dict[str, str] = {}
    if name.endswith("options"):
        if not isinstance(value, dict):
            raise click.BadParameter(f"{path}: [backend_options] must be a table of KEY = VALUE")
        for key, val in value.items():
            if isinstance(val, bool) or not isinstance(val, str | int | float):
                raise click.BadParameter(f"{path}: backend option {key!r} must be a string or a number")
            options[str(key).replace("-", "_")] = str(val)
        return options
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise click.BadParameter(f'{path}: backend_option must be a list of "KEY=VALUE" strings')
    for text in value:
        try:
            key, val = parse_backend_option(text, "backend_option")
        except click.UsageError as exc:
            raise click.BadParameter(f"{path}: {exc.message}") from None
        options[key] = val
    return options


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return value
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    table = data.get("s2cs", data)
    if not isinstance(table, dict):
        raise click.BadParameter(f"{value}: [s2cs] must be a table")
    if table is data:
        table = data = dict(data)
    else:
        table = dict(table)
    ctx.meta[_FILE_BACKEND_OPTIONS] = _file_backend_options(value, table, data)
    defaults: dict[str, Any] = {}
    known = {p.name for p in ctx.command.params if p.name}
    for key, val in table.items():
        name = str(key).replace("-", "_")
        if name == "type":
            name = "type_"
        if name not in known:
            raise click.BadParameter(f"{value}: unknown setting {key!r}")
        # etcd = "http://a:2379,http://b:2379" as well as a list
        defaults[name] = [val] if name == "etcd" and isinstance(val, str) else val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


class _LogFileHandler(logging.FileHandler):
    """--log-file: a write that fails (disk full) is said once on stderr, in one line,
    instead of logging's traceback for every record; it is said again once it recovers."""

    failing = False
    _written = True

    def emit(self, record: logging.LogRecord) -> None:
        self._written = True
        super().emit(record)  # calls handleError (below) when the write fails
        if self._written and self.failing:
            self.failing = False
            sys.stderr.write(f"s2cs: the log file {self.baseFilename} is writable again\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # what is still buffered cannot be written either
            super().close()

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        self._written = False
        if not self.failing:
            self.failing = True
            sys.stderr.write(f"s2cs: cannot write the log file {self.baseFilename}: {exc}\n")


def _setup_logging(verbose: bool, log_file: str) -> None:
    # Log lines carry client text (uids, endpoints, identities): one record, one line.
    fmt = EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(fmt)
    root.addHandler(stderr)
    if log_file:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)
        fh = _LogFileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    # Third-party debug chatter (HTTP bodies of introspection) stays out of our logs.
    for noisy in ("globus_sdk", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "SCISTREAM"})
@click.version_option(__version__, prog_name="s2cs")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    help="TOML file with settings (names as the options, underscores).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=_DEFAULTS.port,
    show_default=True,
    help="gRPC control port (0 = any free port).",
)
@click.option(
    "--bind", default=_DEFAULTS.bind, show_default=True, help="Address the control port listens on."
)
@click.option(
    "--listener_ip",
    "--listener-ip",
    "listener_ip",
    default=_DEFAULTS.listener_ip,
    show_default=True,
    help="Address data listeners bind to and advertise to peers: this gateway's address as the "
    "peer facility reaches it (0.0.0.0 and :: are refused).",
)
@click.option(
    "--port_range",
    "--port-range",
    "port_range",
    default="{}-{}".format(*_DEFAULTS.port_range),
    show_default=True,
    help="Data ports, LOW-HIGH inclusive.",
)
@click.option(
    "--type",
    "-t",
    "type_",
    envvar="SCISTREAM_TYPE",
    default=_DEFAULTS.backend_type,
    show_default=True,
    help=f"Data-plane backend, any case: {', '.join(backend_names())}.",
)
@click.option("--s2ds", "s2ds", default="", help="native backend: s2ds control address (default: spawn/ipc).")
@click.option(
    "--backend-option",
    "--backend_option",
    "backend_option",
    multiple=True,
    metavar="KEY=VALUE",
    allow_from_autoenv=False,  # $SCISTREAM_BACKEND_OPTION is merged per key in build_config
    help="A setting of the --type backend (repeatable), e.g. tls_cert=/etc/scistream/gw.pem; "
    "an unknown KEY is refused with the valid ones. Merged per key over the config file's "
    "[backend_options] and $SCISTREAM_BACKEND_OPTION (shell-quoted KEY=VALUE words).",
)
@click.option(
    "--client_id",
    "--client-id",
    "client_id",
    default=DEFAULT_CLIENT_ID,
    show_default=True,
    help="Globus Auth client id of this gateway.",
)
@click.option(
    "--client_secret",
    "--client-secret",
    "client_secret",
    default="",
    is_flag=False,
    flag_value=_SECRET_FROM_ENV,
    show_default=False,
    help="Globus Auth client secret; enables token checks (on every call but server_info: "
    "a hello then needs the token of the session's owner). Given with no value, it is read "
    "from $SCISTREAM_CLIENT_SECRET.",
)
@click.option(
    "--allowed-identity",
    "--allowed_identity",
    "allowed_identity",
    multiple=True,
    help="Allow-list, with --client-secret: an identity (sub or username) allowed to use this "
    "gateway (repeatable). With this or --allowed-domain set, a caller neither list admits is "
    "refused (PERMISSION_DENIED) on every authenticated call: req, hello, update, release, "
    "status.",
)
@click.option(
    "--allowed-domain",
    "--allowed_domain",
    "allowed_domain",
    multiple=True,
    help="Allow-list, with --client-secret: usernames in this domain (e.g. anl.gov) may use "
    "this gateway (repeatable). With this or --allowed-identity set, a caller neither list "
    "admits is refused (PERMISSION_DENIED) on every authenticated call: req, hello, update, "
    "release, status.",
)
@click.option(
    "--token-cache-ttl",
    "--token_cache_ttl",
    "token_cache_ttl",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.token_cache_ttl,
    show_default=True,
    help="With --client-secret: seconds a token Globus Auth found valid is trusted without "
    "asking again (never past its expiry), so a revoked token stops working within this time.",
)
@click.option(
    "--server_crt",
    "--server-crt",
    "server_crt",
    default=_DEFAULTS.server_crt,
    show_default=True,
    help="PEM certificate of the control channel.",
)
@click.option(
    "--server_key",
    "--server-key",
    "server_key",
    default=_DEFAULTS.server_key,
    show_default=True,
    help="PEM private key of the control channel.",
)
@click.option(
    "--ssl",
    type=click.BOOL,
    default=_DEFAULTS.ssl,
    show_default=True,
    help="TLS on the control channel; False = plaintext (testing only).",
)
@click.option(
    "--handshake-timeout",
    "--handshake_timeout",
    "handshake_timeout",
    type=Seconds(0.1),
    default=_DEFAULTS.handshake_timeout,
    show_default=True,
    help="Seconds a control-port connection has to finish its TLS handshake and HTTP/2 "
    "setup; a stalled one is closed.",
)
@click.option(
    "--security",
    type=click.Choice(SECURITY_MODES, case_sensitive=False),
    default=_DEFAULTS.default_security,
    show_default=True,
    help="Data-channel security of requests that do not name one.",
)
@click.option(
    "--scistream1-compat",
    "--scistream1_compat",
    "scistream1_compat",
    is_flag=True,
    help="SciStream 1.x interoperability: default security 'compat' (TLS 1.2 PSK from the uid).",
)
@click.option(
    "--enforce-rate",
    "--enforce_rate",
    "enforce_rate",
    is_flag=True,
    help="Enforce the 1.x `rate` field, read as kB/s (rate x 1000 bytes/s).",
)
@click.option(
    "--allow-target",
    "--allow_target",
    "allow_target",
    multiple=True,
    help="CIDR that targets may be in (repeatable); default: any unicast network.",
)
@click.option(
    "--state-dir",
    "--state_dir",
    "state_dir",
    default=None,
    help="Session store, audit log, s2ds socket, backend files; one s2cs per directory "
    "(default $SCISTREAM_STATE_DIR, else /var/lib/scistream/<port> as root, "
    "~/.scistream/<port> otherwise).",
)
@click.option(
    "--fresh-state",
    "--fresh_state",
    "fresh_state",
    is_flag=True,
    help="Start with an empty session store even though this state directory held one "
    "that is now missing, empty or unreadable (s2cs refuses to start otherwise); routes "
    "still in the data plane are listed as 'orphaned' for release.",
)
@click.option(
    "--hello-timeout",
    "--hello_timeout",
    "hello_timeout",
    type=Seconds(0.01),
    default=_DEFAULTS.hello_timeout,
    show_default=True,
    help="Seconds a req waits for its hello.",
)
@click.option(
    "--reserved-timeout",
    "--reserved_timeout",
    "reserved_timeout",
    type=Seconds(0.0),
    default=_DEFAULTS.reserved_timeout,
    show_default=True,
    help="Seconds a helloed session may wait for its update (0=never).",
)
@click.option(
    "--idle-timeout",
    "--idle_timeout",
    "idle_timeout",
    type=Seconds(0.0),
    default=_DEFAULTS.idle_timeout,
    show_default=True,
    help="Seconds without traffic before a session expires (0 = never).",
)
@click.option(
    "--metrics-port",
    "--metrics_port",
    "metrics_port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Prometheus metrics on 127.0.0.1:PORT (0 = any free port; default off).",
)
@click.option(
    "--events",
    default=_DEFAULTS.events,
    show_default=True,
    help="ZMQ PUB address for session events: 'ipc' = ipc://<state dir>/events.sock (0600, "
    "readable by this user only), ipc://PATH, tcp://HOST:PORT (only with the two "
    "--events-curve options), or 'off'.",
)
@click.option(
    "--events-curve-secret-file",
    "--events_curve_secret_file",
    "events_curve_secret_file",
    default="",
    help="tcp:// events: this server's CURVE key (.key_secret from `s2ds keygen`); "
    "subscribers need its public .key.",
)
@click.option(
    "--events-curve-client-keys",
    "--events_curve_client_keys",
    "events_curve_client_keys",
    default="",
    help="tcp:// events: directory of the public keys (*.key) of the subscribers admitted.",
)
@click.option(
    "--audit-log", "--audit_log", "audit_log", default="", help="Audit log (default <state dir>/audit.log)."
)
@click.option("--log-file", "--log_file", "log_file", default="", help="Also log to this file (0600).")
@click.option(
    "--etcd",
    "etcd",
    multiple=True,
    metavar="URL[,URL...]",
    help="Join the facility's gateway of several nodes: the etcd cluster's client URLs, "
    "http://HOST:PORT or https://HOST:PORT (TLS: see --etcd-ca), comma-separated or repeated. "
    "The nodes share in etcd their membership, "
    "the sessions and their owners, port reservations and session keys (encrypted with "
    "--etcd-key-file); each node keeps its own --port, --listener-ip, --port-range, state "
    "directory and s2ds. Without --etcd this s2cs is a gateway alone, with its SQLite store.",
)
@click.option(
    "--node-name",
    "--node_name",
    "node_name",
    default=_DEFAULTS.node_name,
    help="With --etcd: this node's name in the cluster, unique among the facility's nodes "
    "(1 to 63 letters, digits, '_', '.', '-') [default: the host name].",
)
@click.option(
    "--node-ttl",
    "--node_ttl",
    "node_ttl",
    type=Seconds(MIN_NODE_TTL, MAX_NODE_TTL),
    default=_DEFAULTS.node_ttl,
    show_default=True,
    help="With --etcd: seconds of this node's etcd lease: a node silent this long is "
    "dead to the others, its connections reported failed and its listeners placed anew; a node "
    "cut off from etcd this long stops taking new sessions.",
)
@click.option(
    "--etcd-key-file",
    "--etcd_key_file",
    "etcd_key_file",
    default=_DEFAULTS.etcd_key_file,
    help="With --etcd (required): the cluster key (from `scistream cluster-key FILE`, mode 0600) "
    "that encrypts session keys before they are written to etcd; every node of the facility "
    "needs the same file.",
)
@click.option(
    "--etcd-ca",
    "--etcd_ca",
    "etcd_ca",
    default=_DEFAULTS.etcd_ca,
    help="With https:// --etcd URLs: the CA certificate(s) (PEM) that sign the etcd members' "
    "certificates; the members are checked against it [default: the system's CAs].",
)
@click.option(
    "--etcd-cert",
    "--etcd_cert",
    "etcd_cert",
    default=_DEFAULTS.etcd_cert,
    help="With https:// --etcd URLs: this node's client certificate (PEM), for an etcd cluster "
    "that runs with --client-cert-auth; needs --etcd-key.",
)
@click.option(
    "--etcd-key",
    "--etcd_key",
    "etcd_key",
    default=_DEFAULTS.etcd_key,
    help="With --etcd-cert: the client certificate's private key (PEM, unencrypted, mode 0600).",
)
@click.option(
    "--etcd-prefix",
    "--etcd_prefix",
    "etcd_prefix",
    default=_DEFAULTS.etcd_prefix,
    show_default=True,
    help="With --etcd: the key prefix all of this gateway's state lives under, starting and "
    "ending with '/'; every node of the facility needs the same one (another prefix is another "
    "gateway, even on the same etcd).",
)
@click.option(
    "--placement",
    type=click.Choice(PLACEMENTS, case_sensitive=False),
    default=_DEFAULTS.placement,
    show_default=True,
    help="With --etcd: how a session's connections go over the live nodes: spread (over as many nodes "
    "as it can), pack (on as few as it can) or load (by each node's load).",
)
@click.option("--v", "--verbose", "-v", "verbose", is_flag=True, help="Debug logging.")
def main(**opts: Any) -> None:
    """SciStream control server (s2cs): gRPC control of data-plane sessions."""
    file_options = click.get_current_context().meta.get(_FILE_BACKEND_OPTIONS, {})
    config = build_config(opts, file_backend_options=file_options)
    _setup_logging(bool(opts["verbose"]), config.log_file)
    from scistream.s2cs.server import StartupError, serve

    try:
        code = asyncio.run(serve(config))
    except StartupError as exc:
        click.echo(f"s2cs: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def backend_options(opts: dict[str, Any], file_options: Mapping[str, str]) -> dict[str, str]:
    """The backend options, merged per key: config file < $SCISTREAM_BACKEND_OPTION < command line."""
    merged = dict(file_options)
    env = os.environ.get(BACKEND_OPTION_ENV, "")
    try:
        words = shlex.split(env)
    except ValueError as exc:
        raise click.UsageError(f"${BACKEND_OPTION_ENV} is not valid shell quoting: {exc}") from None
    for text in words:
        key, value = parse_backend_option(text, f"${BACKEND_OPTION_ENV}:")
        merged[key] = value
    for text in opts.get("backend_option") or ():
        key, value = parse_backend_option(str(text), "--backend-option")
        merged[key] = value
    return merged


def etcd_endpoints(values: Any) -> list[str]:
    """--etcd (repeated and/or comma-separated) -> the endpoint URLs, each checked."""
    items = [values] if isinstance(values, str) else list(values or ())
    urls = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    for url in urls:
        scheme, sep, rest = url.partition("://")
        try:
            if not sep or scheme.lower() not in ("http", "https") or "/" in rest:
                raise InvalidEndpoint("not http(s)://HOST:PORT")
            parse_endpoint(rest)
        except InvalidEndpoint:
            raise click.UsageError(
                f"--etcd {url!r} is not an etcd client URL http://HOST:PORT or https://HOST:PORT "
                "(e.g. http://10.0.0.5:2379)"
            ) from None
    if len({url_uses_tls(url) for url in urls}) > 1:
        raise click.UsageError(
            "--etcd mixes http:// and https:// URLs: the members of one etcd cluster all serve "
            "clients over TLS or all without it"
        )
    return list(dict.fromkeys(urls))


def etcd_tls_settings(opts: Mapping[str, Any], etcd: list[str]) -> dict[str, str]:
    """--etcd-ca/--etcd-cert/--etcd-key, checked against the URLs' scheme (files: preflight)."""
    tls = {name: str(opts.get(name) or "") for name in ("etcd_ca", "etcd_cert", "etcd_key")}
    if any(tls.values()) and not any(url_uses_tls(url) for url in etcd):
        raise click.UsageError(
            "--etcd-ca, --etcd-cert and --etcd-key are for an etcd reached over TLS: give its "
            "https://HOST:PORT URLs with --etcd"
        )
    if bool(tls["etcd_cert"]) != bool(tls["etcd_key"]):
        raise click.UsageError("--etcd-cert and --etcd-key go together: the client certificate and its key")
    return tls


def cluster_settings(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The multi-node settings, checked: ServerConfig keyword arguments (UsageError = exit 2)."""
    etcd = etcd_endpoints(opts.get("etcd"))
    name = str(opts.get("node_name") or "").strip()
    if name and not NODE_NAME.match(name):
        raise click.UsageError(
            f"--node-name {name[:80]!r} is not a node name: 1 to 63 letters, digits, '_', '.' or '-'"
        )
    ttl = float(opts.get("node_ttl", _DEFAULTS.node_ttl))
    if not MIN_NODE_TTL <= ttl <= MAX_NODE_TTL:
        raise click.UsageError(
            f"--node-ttl {ttl:g} is not between {MIN_NODE_TTL:g} and {MAX_NODE_TTL:g} seconds"
        )
    prefix = str(opts.get("etcd_prefix") or "")
    if not (len(prefix) >= 2 and prefix.startswith("/") and prefix.endswith("/")):
        raise click.UsageError(
            f"--etcd-prefix {prefix!r} must start and end with '/' (e.g. {_DEFAULTS.etcd_prefix})"
        )
    placement = str(opts.get("placement") or _DEFAULTS.placement).lower()
    if placement not in PLACEMENTS:
        raise click.UsageError(f"--placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    key_file = str(opts.get("etcd_key_file") or "")
    if etcd and not key_file:
        raise click.UsageError(
            "--etcd needs --etcd-key-file: the cluster key that encrypts session keys in etcd "
            "(make one with `scistream cluster-key FILE` and copy it to every node)"
        )
    return {
        "etcd": etcd,
        **etcd_tls_settings(opts, etcd),
        "node_name": name or default_node_name(),
        "node_ttl": ttl,
        "etcd_key_file": key_file,
        "etcd_prefix": prefix,
        "placement": placement,
    }


def build_config(
    opts: dict[str, Any], *, file_backend_options: Mapping[str, str] | None = None
) -> ServerConfig:
    """Check the options and turn them into a ServerConfig (UsageError = exit 2)."""
    type_name = str(opts["type_"]).strip()
    if type_name.lower() not in BACKENDS:
        raise click.UsageError(
            f"unknown --type {type_name!r}; valid types (any case): {', '.join(backend_names())}"
        )
    try:
        port_range = parse_port_range(str(opts["port_range"]))
    except InvalidEndpoint as exc:
        raise click.UsageError(str(exc)) from None
    secret = opts["client_secret"] or ""
    if secret == _SECRET_FROM_ENV:
        secret = os.environ.get("SCISTREAM_CLIENT_SECRET", "")
        if not secret:
            raise click.UsageError(
                "--client-secret was given without a value and $SCISTREAM_CLIENT_SECRET is not set"
            )
    security = str(opts["security"]).lower()
    compat = bool(opts["scistream1_compat"]) or security == "compat"
    if opts["scistream1_compat"]:
        security = "compat"
    events = str(opts["events"] or "")
    if events.lower() in ("off", "none", "no", "false"):
        events = ""
    import ipaddress

    for cidr in opts["allow_target"]:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise click.UsageError(f"--allow-target {cidr!r} is not a network (e.g. 10.0.0.0/8)") from None
    cluster = cluster_settings(opts)
    return ServerConfig(
        port=int(opts["port"]),
        bind=str(opts["bind"]),
        ssl=bool(opts["ssl"]),
        server_crt=str(opts["server_crt"]),
        server_key=str(opts["server_key"]),
        handshake_timeout=float(opts["handshake_timeout"]),
        listener_ip=str(opts["listener_ip"]),
        port_range=port_range,
        backend_type=type_name,
        s2ds_address=str(opts["s2ds"] or ""),
        backend_extra=backend_options(opts, file_backend_options or {}),
        default_security=security,
        compat_allowed=compat,
        enforce_rate=bool(opts["enforce_rate"]),
        allow_targets=list(opts["allow_target"]),
        client_id=str(opts["client_id"]),
        client_secret=secret,
        allowed_identities=list(opts["allowed_identity"]),
        allowed_domains=list(opts["allowed_domain"]),
        token_cache_ttl=float(opts["token_cache_ttl"]),
        hello_timeout=float(opts["hello_timeout"]),
        reserved_timeout=float(opts["reserved_timeout"]),
        idle_timeout=float(opts["idle_timeout"]),
        state_dir=str(opts["state_dir"] or default_state_dir(int(opts["port"]))),
        fresh_state=bool(opts.get("fresh_state")),
        events=events,
        events_curve_secret_file=str(opts["events_curve_secret_file"] or ""),
        events_curve_client_keys=str(opts["events_curve_client_keys"] or ""),
        metrics_port=opts["metrics_port"],
        audit_log=str(opts["audit_log"] or ""),
        log_file=str(opts["log_file"] or ""),
        **cluster,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
