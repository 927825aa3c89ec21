"""Input checks for the control RPCs: each raises INVALID_ARGUMENT with one sentence.

What passes is returned normalised (an endpoint as the canonical text of its
parsed value), and that is what the session keeps and the backends render;
a refusal quotes the client's text only as a bounded, escaped excerpt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from scistream.clienttext import excerpt
from scistream.endpoints import InvalidEndpoint, normalise
from scistream.s2cs.errors import invalid

MAX_UID = 128
MAX_ENDPOINTS = 1024
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*", re.ASCII)


def uid(text: str) -> str:
    if not text:
        raise invalid("the uid is empty; every request needs a session uid")
    if len(text) > MAX_UID:
        raise invalid(f"the uid is {len(text)} characters long; at most {MAX_UID} are allowed")
    # fullmatch: re's '$' also matches before a trailing newline.
    if not _UID.fullmatch(text):
        raise invalid("the uid may contain only letters, digits, '.', '_', ':' and '-'")
    return text


def role(text: str) -> str:
    """'PROD' or 'CONS' (any case); 1.x peers send exactly these."""
    r = text.strip().upper()
    if r not in ("PROD", "CONS"):
        raise invalid(f"role {excerpt(text, 40)} is not PROD or CONS")
    return r


def num_conn(n: int, limit: int) -> int:
    if not 1 <= n <= limit:
        raise invalid(f"num_conn must be between 1 and {limit}, got {n}")
    return n


def non_negative(name: str, n: int) -> int:
    if n < 0:
        raise invalid(f"{name} must not be negative, got {n}")
    return n


def endpoints(what: str, items: Sequence[str], *, required: bool) -> list[str]:
    if required and not items:
        raise invalid(f"{what} is empty; give at least one host:port")
    if len(items) > MAX_ENDPOINTS:
        raise invalid(f"{what} has {len(items)} entries; at most {MAX_ENDPOINTS} are allowed")
    out = []
    for item in items:
        try:
            out.append(normalise(item))
        except InvalidEndpoint as exc:
            raise invalid(f"{what}: {exc}") from None
    return out
