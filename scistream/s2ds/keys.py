"""CURVE key files for a remote (tcp://) control socket.

Files use ZeroMQ's certificate format (``zmq.auth``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both keys. The daemon admits a client whose
public key is in its ``--curve-client-keys`` directory (every ``*.key`` there).
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth


class CurveKeyError(Exception):
    """A key file is missing or malformed; the message is one sentence."""


def keygen(directory: str | os.PathLike[str], names: tuple[str, ...] = ("server", "client")) -> list[Path]:
    """Create one CURVE keypair per name in ``directory`` (mode 0700, files 0600)."""
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq was built without CURVE support")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    for name in names:
        for suffix in (".key", ".key_secret"):
            if (d / f"{name}{suffix}").exists():
                raise CurveKeyError(f"{d / (name + suffix)} already exists; not overwriting a key")
        old = os.umask(0o077)  # the secret file must never exist with wider permissions
        try:
            public, secret = zmq.auth.create_certificates(str(d), name)
        finally:
            os.umask(old)
        for f in (public, secret):
            os.chmod(f, 0o600)
            written.append(Path(f))
    return written


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE key file {path}: {exc}") from None
    if not secret:
        raise CurveKeyError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The public key from a ``.key`` or ``.key_secret`` file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE key file {path}: {exc}") from None
    return public


def check_client_key_dir(path: str | os.PathLike[str]) -> int:
    """How many client public keys the directory holds; raises if none."""
    d = Path(path)
    if not d.is_dir():
        raise CurveKeyError(f"--curve-client-keys {d} is not a directory")
    n = len(list(d.glob("*.key")))
    if n == 0:
        raise CurveKeyError(f"{d} holds no client public key (*.key); make one with `s2ds keygen`")
    return n
