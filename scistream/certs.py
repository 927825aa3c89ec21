"""Certificates, without openssl incantations: the s2cs control channel, the gateways' WAN leg.

Control channel: a self-signed server certificate (what the 1.x tutorials make
with ``openssl req -x509 ... -addext subjectAltName=IP:...``; clients pin the
file itself) or a small CA plus a leaf it signs (clients pin the CA).

WAN leg (DESIGN decision 9):

* per-session credentials (:func:`mint_session_credentials`), minted by a PROD
  s2cs whose backend cannot use an external PSK (HAProxy, nginx): a
  self-signed listener certificate and a self-signed client certificate, each
  side pinning the other's. They travel to the CONS s2cs exactly like the PSK
  (``session_key``; see :class:`SessionCredentials`), live in memory and in the
  session store, and on disk only 0600 in the session's directory while it runs.
* gateway certificates for unmodified 1.x clients, which carry no key
  (``scistream certs gateway``): an operator CA and one leaf per gateway, good
  for both TLS roles, given to each s2cs as ``tls_cert``/``tls_key``/``tls_ca``.

Keys are written mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import DecodeError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: The first bytes of a ``session_key`` that holds certificates rather than a PSK.
CREDENTIALS_MAGIC = b"S2WC"
#: The name in every minted listener certificate; the CONS side checks it (SNI and
#: host check). Pinning, not the name, is what authenticates the listener.
SESSION_SERVER_NAME = "scistream-session"
#: Minted certificates are pinned by one session and die with it; their validity only
#: has to outlast the longest stream.
SESSION_CERT_DAYS = 3650


@dataclass(frozen=True)
class CaAndLeaf:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"key type {key_type!r} is not 'ec' or 'rsa'")


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start: never a window where the key is readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_key(path: Path, key: PrivateKey) -> None:
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _sans(ip_addresses: list[str], dns_names: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for ip in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"{ip!r} is not an IP address") from None
    names.extend(x509.DNSName(name) for name in dns_names)
    if not names:
        raise ValueError("a server certificate needs at least one IP address or DNS name")
    return names


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    # Backdate a little: peers with a slightly slow clock must accept it too.
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _leaf(
    subject_cn: str,
    key: PrivateKey,
    *,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    sans: list[x509.GeneralName],
    days: int,
    self_signed: bool,
    client_auth: bool = False,
) -> x509.Certificate:
    not_before, not_after = _validity(days)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # A self-signed server cert is its own trust anchor when pinned, so it must
        # be allowed to act as one (OpenSSL refuses CA:FALSE roots for verification).
        .add_extension(x509.BasicConstraints(ca=self_signed, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not self_signed:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_self_signed(
    directory: str | os.PathLike[str],
    ip_addresses: list[str] | None = None,
    dns_names: list[str] | None = None,
    *,
    name: str = "server",
    common_name: str | None = None,
    days: int = 365,
    key_type: str = "ec",
) -> tuple[Path, Path]:
    """Write ``<name>.crt`` and ``<name>.key`` (0600) into ``directory``; return their paths."""
    ips, dns = list(ip_addresses or []), list(dns_names or [])
    sans = _sans(ips, dns)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = _new_key(key_type)
    cn = common_name or (ips[0] if ips else dns[0])
    cert = _leaf(cn, key, issuer=x509.Name([]), issuer_key=key, sans=sans, days=days, self_signed=True)
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def make_ca_and_leaf(
    directory: str | os.PathLike[str],
    ip_addresses: list[str] | None = None,
    dns_names: list[str] | None = None,
    *,
    name: str = "server",
    ca_name: str = "ca",
    common_name: str | None = None,
    days: int = 365,
    key_type: str = "ec",
    client_auth: bool = False,
) -> CaAndLeaf:
    """A CA (``ca.crt``/``ca.key``) and a server leaf it signs (``server.crt``/``server.key``).
    With ``client_auth`` the leaf may also authenticate a client (mutual TLS between gateways)."""
    ips, dns = list(ip_addresses or []), list(dns_names or [])
    sans = _sans(ips, dns)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key(key_type)
    ca_cert = _ca_cert(ca_key, "SciStream control CA", days)
    ca_subject = ca_cert.subject
    key = _new_key(key_type)
    cn = common_name or (ips[0] if ips else dns[0])
    leaf = _leaf(
        cn,
        key,
        issuer=ca_subject,
        issuer_key=ca_key,
        sans=sans,
        days=days,
        self_signed=False,
        client_auth=client_auth,
    )
    paths = CaAndLeaf(
        out / f"{ca_name}.crt", out / f"{ca_name}.key", out / f"{name}.crt", out / f"{name}.key"
    )
    _write_key(paths.ca_key, ca_key)
    _write_cert(paths.ca_cert, ca_cert)
    _write_key(paths.key, key)
    _write_cert(paths.cert, leaf)
    return paths


def _ca_cert(ca_key: PrivateKey, common_name: str, days: int) -> x509.Certificate:
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


#: File stem of the gateway CA that ``scistream certs --gateway`` makes and reuses.
GATEWAY_CA = "gateway-ca"


def make_gateway_cert(
    directory: str | os.PathLike[str],
    name: str,
    ip_addresses: list[str] | None = None,
    dns_names: list[str] | None = None,
    *,
    days: int = 365,
    key_type: str = "ec",
    ca_name: str = GATEWAY_CA,
) -> CaAndLeaf:
    """A gateway certificate ``<name>.crt``/``<name>.key`` for the WAN leg between gateways,
    signed by the gateway CA ``<ca_name>.crt``/``.key`` in ``directory`` (made on first use,
    reused after, so every gateway of a federation shares it). The leaf is good for both
    TLS roles: a gateway is the TLS server of its PROD sessions and the client of its CONS
    sessions. Give each s2cs its own leaf and key plus the CA (``tls_cert``, ``tls_key``,
    ``tls_ca``); the CA key stays with whoever issues the certificates."""
    ips, dns = list(ip_addresses or []), list(dns_names or [])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = out / f"{ca_name}.crt", out / f"{ca_name}.key"
    if ca_cert_path.exists() != ca_key_path.exists():
        raise ValueError(f"{ca_cert_path} and {ca_key_path} must both exist (or neither)")
    if ca_cert_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if not isinstance(loaded, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise ValueError(f"{ca_key_path} is not an EC or RSA key")
        if loaded.public_key() != ca_cert.public_key():
            raise ValueError(f"{ca_key_path} is not the key of {ca_cert_path}")
        ca_key: PrivateKey = loaded
    else:
        ca_key = _new_key(key_type)
        ca_cert = _ca_cert(ca_key, "SciStream gateway CA", days)
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_cert_path, ca_cert)
    key = _new_key(key_type)
    # A CONS gateway checks that the PROD certificate names the listener it dials (or the
    # operator's tls_server_name): give the addresses and names peers reach it at.
    sans = _sans(ips, dns or ([] if ips else [name]))
    leaf = _leaf(
        name,
        key,
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        sans=sans,
        days=days,
        self_signed=False,
        client_auth=True,
    )
    paths = CaAndLeaf(ca_cert_path, ca_key_path, out / f"{name}.crt", out / f"{name}.key")
    _write_key(paths.key, key)
    _write_cert(paths.cert, leaf)
    return paths


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SessionCredentials:
    """The certificate material of one session's WAN leg (all PEM).

    The PROD s2cs keeps all four; the requester (and through it the CONS s2cs)
    gets :meth:`for_consumer`: the listener certificate to pin and the client
    certificate and key to present, never the listener's key. On the wire they
    are ``CREDENTIALS_MAGIC`` + a serialised ``scistream.WanCredentials``
    message, in the ``session_key`` field that carries a PSK otherwise (a PSK
    is at most 64 bytes, credentials are far longer).
    """

    server_cert: bytes
    client_cert: bytes
    client_key: bytes = field(repr=False)
    server_key: bytes = field(default=b"", repr=False)

    def for_consumer(self) -> SessionCredentials:
        return SessionCredentials(self.server_cert, self.client_cert, self.client_key)

    def encode(self) -> bytes:
        from scistream._proto import scistream_pb2 as pb

        msg = pb.WanCredentials(
            server_cert=self.server_cert,
            client_cert=self.client_cert,
            client_key=self.client_key,
            server_key=self.server_key,
        )
        return CREDENTIALS_MAGIC + msg.SerializeToString()

    @classmethod
    def decode(cls, blob: bytes) -> SessionCredentials:
        """Parse and check ``blob``; ValueError (one sentence, no key material) if it is not
        usable credentials."""
        from scistream._proto import scistream_pb2 as pb

        if not is_credentials(blob):
            raise ValueError("the session key does not hold session certificates")
        msg = pb.WanCredentials()
        try:
            msg.ParseFromString(bytes(blob[len(CREDENTIALS_MAGIC) :]))
        except DecodeError:
            raise ValueError("the session certificates are not readable") from None
        creds = cls(msg.server_cert, msg.client_cert, msg.client_key, msg.server_key)
        try:
            server = x509.load_pem_x509_certificate(creds.server_cert)
            client = x509.load_pem_x509_certificate(creds.client_cert)
            client_key = serialization.load_pem_private_key(creds.client_key, None)
            if creds.server_key:
                server_key = serialization.load_pem_private_key(creds.server_key, None)
                if server_key.public_key() != server.public_key():
                    raise ValueError("mismatch")
        except (ValueError, TypeError):
            raise ValueError("the session certificates or their keys are malformed") from None
        if client_key.public_key() != client.public_key():
            raise ValueError("the session client key does not match its certificate")
        return creds


def is_credentials(blob: bytes) -> bool:
    """Whether a ``session_key`` holds certificates (else it is a PSK, or empty)."""
    return bytes(blob[: len(CREDENTIALS_MAGIC)]) == CREDENTIALS_MAGIC


def mint_session_credentials(uid: str) -> SessionCredentials:
    """A fresh listener key + self-signed certificate (name :data:`SESSION_SERVER_NAME`) and a
    client key + self-signed certificate for one session; nothing touches the disk."""
    server_key, client_key = _new_key("ec"), _new_key("ec")
    server = _leaf(
        SESSION_SERVER_NAME,
        server_key,
        issuer=x509.Name([]),
        issuer_key=server_key,
        sans=[x509.DNSName(SESSION_SERVER_NAME)],
        days=SESSION_CERT_DAYS,
        self_signed=True,
    )
    client = _leaf(
        f"scistream session client {uid}"[:64],
        client_key,
        issuer=x509.Name([]),
        issuer_key=client_key,
        sans=[x509.DNSName("scistream-session-client")],
        days=SESSION_CERT_DAYS,
        self_signed=True,
        client_auth=True,
    )
    return SessionCredentials(
        _pem_cert(server), _pem_cert(client), _pem_key(client_key), _pem_key(server_key)
    )


@click.command("certs")
@click.option(
    "--out",
    "-o",
    "out",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory to write the files into.",
)
@click.option("--ip", "ips", multiple=True, help="IP address the s2cs is reached at (repeatable, or a,b).")
@click.option("--dns", "dns", multiple=True, help="DNS name the s2cs is reached at (repeatable, or a,b).")
@click.option("--name", default="server", show_default=True, help="File stem: NAME.crt / NAME.key.")
@click.option("--ca", "with_ca", is_flag=True, help="Also make a CA and sign the server certificate with it.")
@click.option(
    "--gateway",
    "gateway",
    default=None,
    metavar="NAME",
    help="Instead: a gateway certificate NAME.crt/NAME.key for the WAN leg between gateways "
    f"(1.x clients), signed by {GATEWAY_CA}.crt in --out (made on first use, then reused).",
)
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 36500))
@click.option(
    "--key-type", "--key_type", "key_type", type=click.Choice(["ec", "rsa"]), default="ec", show_default=True
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def certs(
    *,
    out: str,
    ips: tuple[str, ...],
    dns: tuple[str, ...],
    name: str,
    with_ca: bool,
    gateway: str | None,
    days: int,
    key_type: str,
    force: bool,
) -> None:
    """Make the s2cs control-channel certificate (self-signed, or --ca for CA + leaf), or
    with --gateway NAME a gateway certificate for the WAN leg.

    Without --ip/--dns it covers 127.0.0.1 and localhost. Give s2cs NAME.crt and
    NAME.key (--server_crt/--server_key) and clients the certificate to pin
    (--server_cert NAME.crt, or ca.crt with --ca).

    Gateway certificates let two s2cs authenticate each other on the WAN leg when
    the client carries no key (an unmodified SciStream 1.x s2uc): run once per
    gateway with the same --out, and give each s2cs its NAME.crt, NAME.key and the
    shared gateway-ca.crt as --backend-option tls_cert=... tls_key=... tls_ca=...
    """
    ip_list = [p.strip() for v in ips for p in v.split(",") if p.strip()]
    dns_list = [p.strip() for v in dns for p in v.split(",") if p.strip()]
    if gateway is not None:
        _gateway_command(Path(out), gateway, ip_list, dns_list, days=days, key_type=key_type, force=force)
        return
    if not ip_list and not dns_list:
        ip_list, dns_list = ["127.0.0.1"], ["localhost"]
    target = Path(out)
    names = [f"{name}.crt", f"{name}.key"] + (["ca.crt", "ca.key"] if with_ca else [])
    existing = [n for n in names if (target / n).exists()]
    if existing and not force:
        raise click.ClickException(f"{target / existing[0]} exists; use --force to overwrite")
    try:
        if with_ca:
            made = make_ca_and_leaf(target, ip_list, dns_list, name=name, days=days, key_type=key_type)
            click.echo(f"CA certificate:     {made.ca_cert} (clients: --server_cert {made.ca_cert})")
            click.echo(f"CA key:             {made.ca_key} (keep offline)")
            click.echo(f"server certificate: {made.cert}")
            click.echo(f"server key:         {made.key}")
        else:
            cert_path, key_path = make_self_signed(
                target, ip_list, dns_list, name=name, days=days, key_type=key_type
            )
            click.echo(f"server certificate: {cert_path} (s2cs --server_crt, clients --server_cert)")
            click.echo(f"server key:         {key_path} (s2cs --server_key)")
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"subjectAltName:     {', '.join([f'IP:{i}' for i in ip_list] + [f'DNS:{d}' for d in dns_list])}"
    )


def _gateway_command(
    out: Path, name: str, ips: list[str], dns: list[str], *, days: int, key_type: str, force: bool
) -> None:
    if not name or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
        raise click.ClickException(f"--gateway {name!r}: use letters, digits, '.', '_' or '-'")
    if name == GATEWAY_CA:
        raise click.ClickException(f"--gateway {name!r} is the CA's own file name; choose another")
    existing = [n for n in (f"{name}.crt", f"{name}.key") if (out / n).exists()]
    if existing and not force:
        raise click.ClickException(f"{out / existing[0]} exists; use --force to overwrite")
    try:
        made = make_gateway_cert(out, name, ips, dns, days=days, key_type=key_type)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"gateway CA:          {made.ca_cert} (every gateway: tls_ca)")
    click.echo(f"gateway CA key:      {made.ca_key} (keep offline; reused for the next gateway)")
    click.echo(f"gateway certificate: {made.cert}")
    click.echo(f"gateway key:         {made.key}")
    click.echo(
        f"s2cs: --backend-option tls_cert={made.cert} --backend-option tls_key={made.key} "
        f"--backend-option tls_ca={made.ca_cert}"
    )
