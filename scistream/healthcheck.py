"""``scistream health``: ask an s2cs's gRPC health service whether it is SERVING.

Used by the container HEALTHCHECK, by operators and by scripts that start an s2cs
and must wait until it serves (``--wait SECONDS``). Exits 0 when SERVING, 1
otherwise (Docker reserves 2), with one sentence saying why (never gRPC's own text).
"""

from __future__ import annotations

import os
import sys
import time

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scistream.cliutil import Seconds
from scistream.grpcutil import ControlError, ExitCode, describe_rpc_error, open_channel

_RETRY_EVERY_S = 0.2


def check(address: str, server_cert: str | None, timeout: float) -> str:
    """The health status name of ``address`` ('SERVING', 'NOT_SERVING', ...).

    Raises ControlError (one sentence) when there is no answer."""
    if server_cert and not os.path.isfile(server_cert):
        raise ControlError(f"server certificate {server_cert!r} not found: give the s2cs certificate with "
                           "--server-cert, or omit it for a plaintext (--ssl False) s2cs", ExitCode.USAGE)
    channel = open_channel(address, server_cert=server_cert, ssl=bool(server_cert))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as err:
            raise describe_rpc_error(err, address, "the health check", timeout=timeout,
                                     ssl=bool(server_cert)) from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def sentence(address: str, status: str) -> str:
    if status == "SERVING":
        return f"s2cs {address}: SERVING"
    return (f"s2cs {address} answers but is not serving ({status}): it is starting, stopping, "
            "or cannot reach its data plane or write its state; its log says which")


@click.command("health")
@click.option("--s2cs", "address", default="127.0.0.1:5000", show_default=True,
              envvar="SCISTREAM_HEALTH_S2CS", help="host:port of the s2cs control server.")
@click.option("--server-cert", "--server_cert", "server_cert", default=None, envvar="SCISTREAM_HEALTH_CERT",
              help="Pinned server certificate (PEM); omit for a plaintext (--ssl False) s2cs.")
@click.option("--timeout", type=Seconds(0.1), default=3.0, show_default=True,
              help="Seconds to wait for each answer.")
@click.option("--wait", "wait", type=Seconds(0.0), default=0.0, show_default=True,
              help="Keep asking for up to this many seconds until the s2cs is SERVING "
              "(e.g. right after starting it); 0 = ask once.")
def health(address: str, server_cert: str | None, timeout: float, wait: float) -> None:
    """Exit 0 if the s2cs at --s2cs reports SERVING."""
    deadline = time.monotonic() + wait
    waited = ""
    while True:
        try:
            status = check(address, server_cert, timeout)
            line = sentence(address, status)
            ok = status == "SERVING"
        except ControlError as exc:
            ok, line = False, exc.message
            if exc.exit_code == ExitCode.USAGE:  # the certificate file: no use retrying
                break
        left = deadline - time.monotonic()
        if ok or left <= 0:
            waited = f" (after waiting {wait:g} s)" if wait and not ok else ""
            break
        time.sleep(min(_RETRY_EVERY_S, left))
    if ok:
        click.echo(line)
        sys.exit(0)
    click.echo(f"scistream health: {line}{waited}", err=True)
    sys.exit(1)  # also for a usage error: a container HEALTHCHECK must not exit 2 (reserved)
