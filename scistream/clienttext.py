"""Client-supplied text shown back to people: bounded and escaped, in one place.

A uid, a role, an endpoint or an identity name comes from whoever reached the
control port, unauthenticated for hello. Echoed verbatim it can forge log lines
(a newline), drive a terminal (escape sequences) or turn one request into
megabytes of log, audit log and error text. Everything that echoes client
text (error messages, logs, the audit log, stderr) goes through here:

* :func:`excerpt` for a value quoted in a sentence: repr-like escaping of at
  most :data:`EXCERPT_CHARS` characters, then ``... (N bytes)`` when cut;
* :func:`escape` for text already bounded (a validated uid, a log message):
  non-printable characters become Python escapes, nothing is cut;
* :class:`EscapingFormatter` for a log handler: every line it writes is one
  line, whatever the arguments held (a last line of defence for a call that
  forgot the two above).
"""

from __future__ import annotations

import logging

#: Characters of client text quoted in an error message or a log line.
EXCERPT_CHARS = 64
#: Characters of one log message (before the traceback, if any) a handler writes.
MAX_LOG_MESSAGE = 16384


def escape(text: str) -> str:
    """``text`` with control, format and separator characters (and backslash) escaped as
    Python does in ``repr``; printable text, accented letters included, is unchanged."""
    if text.isprintable() and "\\" not in text:
        return text
    return repr(text)[1:-1]


def excerpt(text: object, limit: int = EXCERPT_CHARS) -> str:
    """A quoted, escaped excerpt of ``text`` for a sentence: ``'abc'``, or ``'abc'... (N bytes)``
    when ``text`` is longer than ``limit`` characters (N: its UTF-8 length)."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return repr(s)
    size = len(s.encode("utf-8", "surrogatepass"))
    return f"{s[:limit]!r}... ({size} bytes)"


def bounded(text: str, limit: int) -> str:
    """``text`` itself when at most ``limit`` characters, else its first ``limit``
    characters and how long it was (no quoting, no escaping: for JSON fields)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text.encode('utf-8', 'surrogatepass'))} bytes)"


class EscapingFormatter(logging.Formatter):
    """A Formatter whose every record is one line of bounded length.

    The message (with its arguments) is escaped and cut at :data:`MAX_LOG_MESSAGE`
    characters; a traceback, which is ours, keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        message = record.message
        if len(message) > MAX_LOG_MESSAGE:
            message = bounded(message, MAX_LOG_MESSAGE)
        record.message = escape(message)
        return super().formatMessage(record)
