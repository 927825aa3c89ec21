"""Pre-shared keys as stunnel reads them, so our keys mean what a 1.x gateway's mean.

stunnel 5.68 decodes the key text of a ``PSKsecrets`` line as hex when it is an
even number of hex digits, and uses any other text as its bytes (checked
against stunnel4 here with ``openssl s_client -psk``). A SciStream 1.x gateway
writes ``client1:<uid without dashes>``: 32 hex digits, so its real key is the
16 bytes they encode, not the 32 ASCII characters.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})+$")


def stunnel_key_bytes(text: str) -> bytes:
    """The key bytes stunnel uses for the key text ``text``."""
    return bytes.fromhex(text) if _HEX.match(text) else text.encode()


def compat_key(uid: str) -> bytes:
    """The key a SciStream 1.x stunnel derives from a session uid."""
    return stunnel_key_bytes(uid.strip().replace("-", ""))


def as_stunnel_key(key: bytes) -> bytes:
    """A compat-mode key given as key *text* (e.g. the uid without dashes) turned into
    the bytes stunnel would use; raw key bytes are returned unchanged."""
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return key
    return stunnel_key_bytes(text)
