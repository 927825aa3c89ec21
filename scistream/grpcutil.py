"""Client-side gRPC helpers shared by s2uc and appctrl.

Channels pin the s2cs certificate file as the only trust root (the 1.x
``--server_cert`` semantics), every call carries a deadline, and every gRPC
failure becomes a :class:`ControlError`: one human sentence plus an exit code,
never a traceback.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before gRPC's core starts: it would log TLS handshake failures to stderr at
# INFO, beside the one line we print for them.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from scistream.endpoints import InvalidEndpoint, parse_endpoint

INVALID_TOKEN = "INVALID_TOKEN"
# 1.2.1 holds a req open until the hello arrives, for up to 180 s.
REQ_DEADLINE_S = 190.0
CALL_DEADLINE_S = 15.0


class ExitCode(enum.IntEnum):
    """Distinct exit codes so scripts can tell failures apart (2 is click's usage error)."""

    FAILURE = 1
    USAGE = 2
    UNREACHABLE = 3
    AUTH = 4
    NOT_FOUND = 5
    UNSUPPORTED = 6
    TIMEOUT = 7


class ControlError(Exception):
    """A failure to report to the user as one line.

    One made from a gRPC failure (:func:`describe_rpc_error`) also says which s2cs
    ``address`` answered what ``status``, and whether gRPC's ``transport`` made the
    status up itself (the s2cs was not reached, or went away mid-call): a client with
    several addresses of one gateway decides from these whether to try the next one."""

    def __init__(
        self,
        message: str,
        exit_code: int = ExitCode.FAILURE,
        *,
        address: str = "",
        status: grpc.StatusCode | None = None,
        transport: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = int(exit_code)
        self.address = address
        self.status = status
        self.transport = transport

    @property
    def unavailable(self) -> bool:
        """The s2cs could not serve the call (unreachable, or its own UNAVAILABLE): another
        node of the same gateway may."""
        return self.status == grpc.StatusCode.UNAVAILABLE

    def __str__(self) -> str:
        return self.message


# The uids an s2cs accepts (s2cs/validate.py): checked before anything is sent.
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_uid(uid: str) -> str:
    """A session uid the s2cs will accept, else a usage error saying what is wrong."""
    if not _UID.match(uid):
        raise ControlError(
            f"uid {uid[:60]!r} is not a session id: 1 to 128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
            ExitCode.USAGE,
        )
    return uid


def check_address(address: str) -> str:
    """Validate a ``host:port`` s2cs address; gRPC would otherwise fail obscurely."""
    try:
        parse_endpoint(address)
    except InvalidEndpoint as exc:
        raise ControlError(f"s2cs address: {exc}", ExitCode.USAGE) from None
    return address


def check_addresses(text: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]``: the addresses of one gateway's s2cs nodes, in the
    order they are tried, each validated (one address: exactly :func:`check_address`)."""
    parts = split_csv(text)
    if len(parts) <= 1:
        return [check_address(text)]
    return [check_address(part) for part in dict.fromkeys(parts)]


def _read_cert(server_cert: str | os.PathLike[str]) -> bytes:
    path = Path(server_cert)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ControlError(
            f"server certificate {str(path)!r} not found: give the s2cs certificate with --server_cert, "
            "or --no-ssl for a plaintext s2cs",
            ExitCode.USAGE,
        ) from None
    except OSError as exc:
        raise ControlError(
            f"cannot read server certificate {str(path)!r}: {exc.strerror}", ExitCode.USAGE
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ControlError(f"{str(path)!r} is not a PEM certificate", ExitCode.USAGE)
    return pem


# Keepalives keep long req calls (blocked until hello) alive across idle NAT/firewalls.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.enable_retries", 0),
]


def channel_credentials(server_cert: str | os.PathLike[str]) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=_read_cert(server_cert))


def open_channel(
    address: str, *, server_cert: str | os.PathLike[str] | None, ssl: bool = True
) -> grpc.Channel:
    """A blocking channel to an s2cs; TLS pinned to ``server_cert`` unless ``ssl`` is False."""
    check_address(address)
    if not ssl:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    if server_cert is None:
        raise ControlError("TLS needs the s2cs certificate: give --server_cert", ExitCode.USAGE)
    return grpc.secure_channel(address, channel_credentials(server_cert), options=_CHANNEL_OPTIONS)


def open_aio_channel(
    address: str, *, server_cert: str | os.PathLike[str] | None, ssl: bool = True
) -> grpc.aio.Channel:
    """The asyncio twin of :func:`open_channel` (appctrl's library API)."""
    check_address(address)
    if not ssl:
        return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
    if server_cert is None:
        raise ControlError("TLS needs the s2cs certificate: give --server_cert", ExitCode.USAGE)
    return grpc.aio.secure_channel(address, channel_credentials(server_cert), options=_CHANNEL_OPTIONS)


def auth_metadata(token: str | None) -> list[tuple[str, str]]:
    """1.x sends the raw access token, or the literal INVALID_TOKEN when it has none."""
    return [("authorization", token or INVALID_TOKEN)]


_TLS_HINTS = ("ssl", "handshake", "certificate", "tsi_", "peer name", "alpn")
# How gRPC's own transport begins the detail of an UNAVAILABLE it made up itself (no
# answer came from the server). Any other UNAVAILABLE was sent by the s2cs, with a
# sentence of its own ("the gateway cannot reach Globus Auth ..."): the s2cs was reached,
# and its sentence may well contain "connection refused" about something else.
_TRANSPORT_PREFIXES = (
    "failed to connect",
    "dns resolution",
    "name resolution",
    "empty address list",
    "socket closed",
    "connection reset",
    "connection refused",
    "connection timed out",
    "end of tcp stream",
    "broken pipe",
    "stream removed",
    "goaway",
    "keepalive",
    "transport closed",
    "endpoint closing",
    "connections to all backends failing",
    "cancelling all calls",
    "recvmsg",
    "sendmsg",
    "ssl handshake",
    "handshake",
    "tcp handshaker",
    "network is unreachable",
    "no route to host",
    "unavailable",
    "ipv4:",
    "ipv6:",
    "unix:",
)
# In the detail gRPC gives a deadline that ran out on the client's side
# ("Deadline Exceeded", "Stream removed (Deadline Exceeded)").
_CLIENT_DEADLINE = "deadline exceeded"


def _first_line(text: str | None, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_rpc_error(
    err: grpc.RpcError, address: str, method: str, *, timeout: float | None = None, ssl: bool = True
) -> ControlError:
    """Turn a gRPC failure into one sentence a user can act on."""
    out = _describe(err, address, method, timeout=timeout, ssl=ssl)
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    out.address, out.status = address, code if isinstance(code, grpc.StatusCode) else None
    out.transport = code == grpc.StatusCode.UNAVAILABLE and _from_transport(
        err.details() if hasattr(err, "details") else str(err)
    )
    return out


def _from_transport(details: str | None) -> bool:
    """An UNAVAILABLE gRPC's transport made up (no answer came from the s2cs)."""
    low = (details or "").lower()
    return not _first_line(details) or low.strip().startswith(_TRANSPORT_PREFIXES)


def _describe(
    err: grpc.RpcError, address: str, method: str, *, timeout: float | None, ssl: bool
) -> ControlError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    detail = _first_line(details)
    low = (details or "").lower()
    if code == grpc.StatusCode.UNAVAILABLE and not _from_transport(details):
        return ControlError(f"s2cs at {address} cannot serve {method} now: {detail}", ExitCode.FAILURE)
    if code == grpc.StatusCode.UNAVAILABLE:
        if ssl and any(h in low for h in _TLS_HINTS):
            return ControlError(
                f"TLS handshake with s2cs at {address} failed: its certificate does not match --server_cert "
                "(or it does not speak TLS; --no-ssl for a plaintext s2cs)",
                ExitCode.UNREACHABLE,
            )
        if "socket closed" in low or "connection reset" in low or "end of tcp stream" in low:
            hint = (
                " (is it a TLS server? drop --no-ssl)"
                if not ssl
                else " (is it a plaintext s2cs? try --no-ssl)"
            )
            return ControlError(f"s2cs at {address} closed the connection{hint}", ExitCode.UNREACHABLE)
        if "connection refused" in low:
            why = "connection refused (is s2cs running there, on that port?)"
        elif "resolv" in low or "name not found" in low or "not known" in low:
            why = "cannot resolve its host name"
        elif "timed out" in low or "timeout" in low:
            why = "the connection timed out"
        else:
            why = detail or "unavailable"
        return ControlError(f"cannot reach s2cs at {address}: {why}", ExitCode.UNREACHABLE)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and detail and _CLIENT_DEADLINE not in low:
        # The s2cs's own deadline (its --hello-timeout), in its own words, not ours.
        return ControlError(f"s2cs at {address}: {detail}", ExitCode.TIMEOUT)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g} s" if timeout else ""
        what = "the application's hello did not arrive" if method == "req" else f"{method} did not complete"
        return ControlError(f"s2cs at {address}: {what}{within}", ExitCode.TIMEOUT)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ControlError(
            f"s2cs at {address} rejected the credentials: {detail or 'unauthenticated'} "
            "(log in with `s2uc login --scope <scope>`)",
            ExitCode.AUTH,
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ControlError(
            f"s2cs at {address} refused {method}: {detail or 'permission denied'}", ExitCode.AUTH
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return ControlError(f"s2cs at {address}: {detail or 'no such session'}", ExitCode.NOT_FOUND)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ControlError(
            f"this s2cs (SciStream 1.x) has no {method} command ({address})", ExitCode.UNSUPPORTED
        )
    if code == grpc.StatusCode.CANCELLED:
        return ControlError(f"{method} to s2cs at {address} was cancelled", ExitCode.FAILURE)
    label = code.name.lower().replace("_", " ") if isinstance(code, grpc.StatusCode) else "error"
    return ControlError(f"s2cs at {address} failed {method} ({label}): {detail or 'no details'}")


def failover_error(
    method: str, tried: Sequence[ControlError], final: ControlError, *, uid: str = ""
) -> ControlError:
    """The one error of a call tried on several s2cs nodes of a gateway, naming what each
    answered: ``tried`` answered UNAVAILABLE (in order), ``final`` is the last answer."""
    if not tried:
        return final
    every = [*tried, final]
    if final.unavailable:
        codes = {e.exit_code for e in every}
        return ControlError(
            f"no s2cs of {', '.join(e.address for e in every)} could serve {method}: "
            + "; ".join(e.message for e in every),
            codes.pop() if len(codes) == 1 else ExitCode.FAILURE,
            address=final.address,
            status=final.status,
            transport=final.transport,
        )
    before = "; ".join(e.message for e in tried)
    lost = [e.address for e in tried if e.transport]
    if method == "req" and final.status == grpc.StatusCode.ALREADY_EXISTS and lost:
        message = (
            f"{final.message}: the same req went to {', '.join(lost)} first, which may have created "
            f"this session before the connection was lost ({before}); see it with `s2uc check-status "
            f"{uid or 'UID'}`, and release it with `s2uc release {uid or 'UID'}` before trying again"
        )
    else:
        message = f"{final.message} (after {before})"
    return ControlError(
        message, final.exit_code, address=final.address, status=final.status, transport=final.transport
    )


def is_unimplemented(err: BaseException) -> bool:
    return isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNIMPLEMENTED


def call(
    method: Any,
    request: Any,
    *,
    address: str,
    name: str,
    token: str | None,
    timeout: float,
    ssl: bool = True,
) -> Any:
    """Invoke a blocking stub method with a deadline and auth metadata; errors become ControlError."""
    try:
        return method(request, timeout=timeout, metadata=auth_metadata(token))
    except grpc.RpcError as err:
        raise describe_rpc_error(err, address, name, timeout=timeout, ssl=ssl) from None


def split_csv(values: Sequence[str] | str) -> list[str]:
    """``a,b`` / ``["a,b", "c"]`` -> ``["a", "b", "c"]``: options take lists both ways."""
    items = [values] if isinstance(values, str) else list(values)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def port_list(values: Sequence[str] | str, option: str, *, required: bool = False) -> list[int]:
    """The port numbers given to ``option`` (comma-separated); one that is not a port, or
    none at all when ``required``, is a usage error naming the option."""
    ports = []
    for item in split_csv(values):
        if not (item.isascii() and item.isdigit()) or not 1 <= int(item) <= 65535:
            raise ControlError(f"{option}: {item!r} is not a port number", ExitCode.USAGE)
        ports.append(int(item))
    if required and not ports:
        raise ControlError(f"{option}: no ports given", ExitCode.USAGE)
    return ports
