"""Data-channel pre-shared keys: how they are derived, read and written, in one place.

Inside the Python layers a key is always ``bytes``; text forms (hex, stunnel's
key text) exist only at the edges: a PSKsecrets file read or written, a stored
row of an older version, a 1.x key given as text.

stunnel 5.68 decodes the key text of a ``PSKsecrets`` line as hex when it is an
even number of hex digits, and uses any other text as its bytes (checked
against stunnel4 with ``openssl s_client -psk``). A SciStream 1.x gateway
writes ``client1:<uid without dashes>``: 32 hex digits, so its real key is the
16 bytes they encode, not the 32 ASCII characters. Every gateway here (native
engine, stunnel backend, ``s2ds forward``) derives the same 16 bytes from a uid.
"""

from __future__ import annotations

import hashlib
import hmac
import re

#: The PSK identity every SciStream 1.x stunnel config uses.
COMPAT_PSK_IDENTITY = "client1"

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


def key_from_stunnel_text(text: str) -> bytes:
    """The key bytes stunnel uses for the KEY text of a PSKsecrets line: hex-decoded
    when the text is only hex digits (even length), else the text's bytes."""
    return bytes.fromhex(text) if _HEX.fullmatch(text) else text.encode("utf-8")


def stunnel_key_text(key: bytes) -> str:
    """The KEY text of a PSKsecrets line that makes stunnel use exactly ``key``."""
    return key.hex()


def compat_key(uid: str) -> bytes:
    """The key a SciStream 1.x stunnel gateway derives from the session ``uid``."""
    return key_from_stunnel_text(uid.strip().replace("-", ""))


def compat_key_bytes(key: bytes) -> bytes:
    """A compat-mode key that arrived as key *text* (e.g. the uid without dashes, as a
    1.x gateway writes it) turned into the bytes stunnel would use; key bytes that are
    not such text are returned unchanged. Applied where a compat key enters."""
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return key
    return key_from_stunnel_text(text)


def key_fingerprint(key: bytes) -> str:
    """A label that tells whether a route's key changed without revealing it.

    s2ds never echoes keys back, so the native backend compares this instead. It
    is a keyed hash of a key of at least 16 random bytes: it cannot be turned back
    into the key."""
    return hmac.new(b"scistream route key fingerprint", key, hashlib.sha256).hexdigest()[:16]
