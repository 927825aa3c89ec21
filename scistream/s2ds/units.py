"""Human-friendly byte sizes and rates for the s2ds command line.

Sizes (buffers) use binary multiples, as the kernel and HAProxy do:
``256K`` = 262144 bytes. Rates use decimal multiples, as networks do:
``100M`` = 100,000,000 bytes/s; a ``bit``/``bps`` suffix means bits/s
(``10Gbit`` = 1.25 GB/s), and ``Ki``/``Mi``/``Gi`` ask for binary multiples.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?B?)\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)\s*(B|B/s|Bps|bit|bits|bit/s|bps)?\s*$")
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """``1048576``, ``1024K``, ``1M``, ``1MiB`` -> 1048576 (binary multiples)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M, G or T suffix)")
    return int(m.group(1)) * 1024 ** _POWER[m.group(2).lower()]


def parse_rate(text: str) -> int:
    """A rate in bytes/s: ``500k``, ``100M``, ``1G`` (decimal), ``10Gbit``, ``1MiB``; ``0`` = none."""
    m = _RATE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a rate; write e.g. 500k, 100M or 1G (bytes/s) or 10Gbit (bits/s)")
    base = 1024 if m.group(3) else 1000
    value = float(m.group(1)) * base ** _POWER[m.group(2).lower()]
    if (m.group(4) or "").startswith("bit") or m.group(4) == "bps":
        value /= 8
    rate = int(value)
    if value > 0 and rate == 0:
        raise ValueError(f"rate {text!r} is below 1 byte/s")
    return rate


def format_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal, for counters people read)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover - loop always returns
