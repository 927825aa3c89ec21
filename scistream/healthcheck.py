"""``scistream health``: ask an s2cs's gRPC health service whether it is SERVING.

Used by the container HEALTHCHECK and by operators; exits 0 when SERVING, 1
otherwise, with one line saying why.
"""

from __future__ import annotations

import sys

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, server_cert: str | None, timeout: float) -> str:
    """The health status name of ``address`` ('SERVING', 'NOT_SERVING', ...)."""
    if server_cert:
        with open(server_cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@click.command("health")
@click.option("--s2cs", "address", default="127.0.0.1:5000", show_default=True,
              envvar="SCISTREAM_HEALTH_S2CS", help="host:port of the s2cs control server.")
@click.option("--server-cert", "--server_cert", "server_cert", default=None, envvar="SCISTREAM_HEALTH_CERT",
              help="Pinned server certificate (PEM); omit for a plaintext (--ssl False) s2cs.")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for the answer.")
def health(address: str, server_cert: str | None, timeout: float) -> None:
    """Exit 0 if the s2cs at --s2cs reports SERVING."""
    try:
        status = check(address, server_cert, timeout)
    except (grpc.RpcError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        click.echo(f"s2cs {address} did not answer the health check: {detail}", err=True)
        sys.exit(1)
    click.echo(f"s2cs {address}: {status}")
    sys.exit(0 if status == "SERVING" else 1)
