"""Checks s2cs runs before it starts anything, so a bad setting stops it at once with
its true cause instead of failing every later request (or gRPC's vague "cannot
listen"): the listener address must be one of this host's, the control port free
on a local address, the control-channel certificate and key readable, PEM, and a
pair; with --etcd, the cluster key a private file holding a key, and etcd's CA and client
certificate (if given) PEM, the certificate and key a pair.
"""

from __future__ import annotations

import errno
import socket

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scistream.endpoints import InvalidEndpoint, format_endpoint, parse_endpoint
from scistream.s2cs.clusterkey import ClusterKeyError, load_cluster_key
from scistream.s2cs.config import ServerConfig, listener_ip_problem


class PreflightError(Exception):
    """A setting s2cs cannot run with; the message is one sentence for the operator."""


def _addresses(host: str) -> list[tuple[int, str]]:
    """(family, address) of ``host`` (an address or a host name); gaierror if it resolves to none."""
    try:
        parse_endpoint(format_endpoint(host.strip("[]"), 1))
    except InvalidEndpoint:  # no name at all (999.1.1.1, a_b): nothing to ask a resolver
        raise socket.gaierror(socket.EAI_NONAME, "not an IP address or a host name") from None
    infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((family, str(sa[0])) for family, _, _, _, sa in infos))


def _bind_error(family: int, address: str, port: int) -> OSError | None:
    """Why binding ``address``:``port`` fails now (None: it works). SO_REUSEADDR as the
    servers set it: only a listening socket makes a port busy."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            return exc
    return None


def check_listener_ip(listener_ip: str) -> None:
    problem = listener_ip_problem(listener_ip)
    if problem:
        raise PreflightError(problem)
    try:
        addresses = _addresses(listener_ip)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise PreflightError(
            f"--listener-ip {listener_ip!r} is neither an IP address nor a host name that resolves "
            f"({reason}); set it to the address the peer facility reaches this gateway at"
        ) from None
    failures = []
    for family, address in addresses:
        err = _bind_error(family, address, 0)
        if err is None:
            return
        failures.append(f"{address}: {err.strerror}")
    raise PreflightError(
        f"--listener-ip {listener_ip} is not an address of this host (binding to "
        f"{'; '.join(failures)}): data listeners are bound to it, so set it to one of this "
        "gateway's own addresses, the one the peer facility reaches"
    )


def check_control_port(bind: str, port: int) -> None:
    if port == 0:
        return
    try:
        addresses = _addresses(bind)
    except (socket.gaierror, UnicodeError):
        raise PreflightError(
            f"--bind {bind!r} is neither an IP address nor a host name that resolves"
        ) from None
    for family, address in addresses:
        err = _bind_error(family, address, port)
        if err is None:
            continue
        if err.errno == errno.EADDRINUSE:
            raise PreflightError(
                f"cannot listen on {address}:{port}: the control port is already in use (another "
                "s2cs?); stop that process or give another --port"
            )
        raise PreflightError(f"cannot listen on {address}:{port} (--bind {bind}): {err.strerror}")


def check_tls_files(
    cert_path: str,
    key_path: str,
    *,
    cert_option: str = "--server_crt",
    key_option: str = "--server_key",
    whose: str = "control-channel",
    hint: str = "make them with `scistream certs`, or run with --ssl False for a plaintext test server",
) -> None:
    """A certificate and its key (the control channel's, or etcd's client pair): readable,
    PEM, and a pair."""
    blobs = []
    for option, path in ((cert_option, cert_path), (key_option, key_path)):
        try:
            with open(path, "rb") as f:
                blobs.append(f.read())
        except OSError as exc:
            raise PreflightError(
                f"cannot read the {whose} {'certificate' if option == cert_option else 'key'} "
                f"{option} {path}: {exc.strerror}; {hint}"
            ) from None
    crt, key = blobs
    try:
        cert = x509.load_pem_x509_certificate(crt)
    except ValueError:
        raise PreflightError(
            f"{cert_option} {cert_path} is not a PEM certificate (it must begin with "
            "-----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise PreflightError(
            f"{key_option} {key_path} is encrypted with a passphrase; s2cs needs it unencrypted "
            "(mode 0600)"
        ) from None
    except (ValueError, x509.UnsupportedGeneralNameType):
        raise PreflightError(f"{key_option} {key_path} is not a PEM private key") from None
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise PreflightError(
            f"{key_option} {key_path} does not belong to the certificate {cert_option} {cert_path} "
            "(their public keys differ); give the key the certificate was issued for"
        )


def check_etcd_tls(ca_path: str, cert_path: str, key_path: str) -> None:
    """--etcd-ca: readable PEM certificates; --etcd-cert and --etcd-key: a pair."""
    if ca_path:
        try:
            with open(ca_path, "rb") as f:
                x509.load_pem_x509_certificates(f.read())
        except OSError as exc:
            raise PreflightError(f"cannot read the etcd CA --etcd-ca {ca_path}: {exc.strerror}") from None
        except ValueError:
            raise PreflightError(
                f"--etcd-ca {ca_path} is not a PEM file of certificates (the CA that signs the etcd "
                "members' certificates)"
            ) from None
    if cert_path or key_path:
        check_tls_files(
            cert_path,
            key_path,
            cert_option="--etcd-cert",
            key_option="--etcd-key",
            whose="etcd client",
            hint="give this node's client certificate and key, issued by the CA your etcd trusts",
        )


def check_cluster_key(path: str) -> None:
    """--etcd-key-file: a regular file only this user may read, holding a 32-byte key."""
    if not path:
        raise PreflightError(
            "--etcd needs --etcd-key-file: the cluster key that encrypts session keys in etcd "
            "(make one with `scistream cluster-key FILE` and copy it to every node)"
        )
    try:
        load_cluster_key(path)
    except ClusterKeyError as exc:
        raise PreflightError(f"--etcd-key-file: {exc}") from None


def check(config: ServerConfig) -> None:
    """Every check, in the order an operator would fix them; raises PreflightError."""
    check_listener_ip(config.listener_ip)
    check_control_port(config.bind, config.port)
    if config.ssl:
        check_tls_files(config.server_crt, config.server_key)
    if config.clustered:
        check_cluster_key(config.etcd_key_file)
        check_etcd_tls(config.etcd_ca, config.etcd_cert, config.etcd_key)
