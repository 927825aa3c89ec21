"""Client text echoed back (issue 14 item 4, issue 10 item 8): bounded, escaped, one log line."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import grpc
import pytest

from scistream.clienttext import MAX_LOG_MESSAGE, EscapingFormatter, escape, excerpt
from scistream.s2cs import validate
from scistream.s2cs.audit import MAX_FIELD_CHARS, AuditLog
from scistream.s2cs.backends.supervisor import failure_reason, last_log_line
from scistream.s2cs.errors import MAX_MESSAGE_CHARS, ControlError, not_found

FORGED = "abc\n2026-01-01 00:00:00,000 INFO scistream.s2cs.manager: session x: released"


def test_escape_keeps_printable_text_and_escapes_the_rest() -> None:
    assert escape("alice@uchicago.edu") == "alice@uchicago.edu"
    assert escape("josé") == "josé"
    assert escape("a\nb\r\x1b[31m\u2028\x00\\") == "a\\nb\\r\\x1b[31m\\u2028\\x00\\\\"


def test_excerpt_is_bounded_quoted_and_escaped() -> None:
    assert excerpt("PROD") == "'PROD'"
    big = "\n" * 900_000
    shown = excerpt(big)
    assert shown.isprintable() and shown.endswith("... (900000 bytes)") and len(shown) < 300
    assert excerpt("é" * 100, 4) == "'éééé'... (200 bytes)"


def _one_record(formatter: logging.Formatter, msg: str, *args: object, exc: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("test_client_text.formatter")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        if exc:
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception(msg, *args)
        else:
            logger.warning(msg, *args)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_the_s2cs_log_formatter_writes_one_line_per_record() -> None:
    fmt = EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    out = _one_record(fmt, "hello %s by %s: %s", FORGED, "anonymous", "INVALID_ARGUMENT")
    assert out.count("\n") == 1 and out.startswith("WARNING test_client_text.formatter: hello abc\\n2026")
    huge = _one_record(fmt, "endpoint %s", "x" * 1_000_000)
    assert huge.count("\n") == 1 and len(huge) < MAX_LOG_MESSAGE + 200
    # A traceback is ours and keeps its lines; the message before it is still one line.
    tb = _one_record(fmt, "rpc for %r failed: %s", "u", FORGED, exc=True)
    first, rest = tb.split("\n", 1)
    assert "abc\\n2026" in first and rest.startswith("Traceback") and "ValueError: boom" in rest


def test_the_audit_log_bounds_every_string_field(tmp_path: Path) -> None:
    audit = AuditLog(str(tmp_path / "audit.log"))
    try:
        audit.record(event="rpc", rpc="hello", uid=FORGED, reason="endpoint " + "x" * 900_000)
    finally:
        audit.close()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 3 * MAX_FIELD_CHARS
    entry = json.loads(lines[0])
    assert entry["uid"] == FORGED
    assert entry["reason"].endswith("... (900009 bytes)")


def test_error_messages_are_bounded() -> None:
    err = ControlError(grpc.StatusCode.INVALID_ARGUMENT, "x" * 100_000)
    assert len(err.message) < MAX_MESSAGE_CHARS + 40 and str(err) == err.message
    assert "\n" not in not_found("a\nb").message


@pytest.mark.parametrize("bad", ["abc\n", "a\nb", "abc\r", "ab c", "é", "a\x00"])
def test_a_uid_with_a_control_character_is_refused(bad: str) -> None:
    with pytest.raises(ControlError) as info:
        validate.uid(bad)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_endpoints_are_returned_normalised_and_refusals_bounded() -> None:
    given = [" 127.0.0.1:80", "[::FFFF:127.0.0.1]:81", "LocalHost:82"]
    assert validate.endpoints("x", given, required=True) == [
        "127.0.0.1:80",
        "127.0.0.1:81",
        "localhost:82",
    ]
    with pytest.raises(ControlError) as info:
        validate.endpoints("prod_listeners", ["[::1%" + "\n" * 900_000 + "]:1"], required=True)
    assert len(info.value.message) < 300 and info.value.message.isprintable()
    with pytest.raises(ControlError) as info:
        validate.role("P\nROD" * 100_000)
    assert len(info.value.message) < 200 and info.value.message.isprintable()


def test_proxy_log_lines_shown_as_session_errors_are_escaped(tmp_path: Path) -> None:
    # stunnel logs the PSK identity a remote TLS client sent; that line may become an error text.
    log = tmp_path / "proxy.log"
    log.write_bytes(b"LOG5[0]: PSK identity not found: \x1b]0;owned\x07evil\r\nLOG3[0]: failed: \x1b[2J\n")
    assert failure_reason(log) == "LOG5[0]: PSK identity not found: \\x1b]0;owned\\x07evil"
    assert last_log_line(log) == "LOG3[0]: failed: \\x1b[2J"
    assert all(line.isprintable() for line in (failure_reason(log), last_log_line(log)))
