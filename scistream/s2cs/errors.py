"""The one error type the control layer raises: a gRPC status code and one sentence.

Everything below the servicer raises :class:`ControlError`; the servicer turns
it into a gRPC status. Any other exception is a bug: the servicer logs it and
answers INTERNAL with a generic sentence (never UNKNOWN, never a traceback).
A message that quotes client text quotes it through scistream.clienttext.excerpt
(bounded, escaped): the message is also logged and written to the audit log.
"""

from __future__ import annotations

import grpc

from scistream.clienttext import bounded, excerpt

#: Characters of one error message; anything longer was built from text nobody should read whole.
MAX_MESSAGE_CHARS = 2048


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = bounded(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(uid: str) -> ControlError:
    return ControlError(grpc.StatusCode.NOT_FOUND, f"no session with uid {excerpt(uid)} on this gateway")


def invalid(message: str) -> ControlError:
    return ControlError(grpc.StatusCode.INVALID_ARGUMENT, message)


def precondition(message: str) -> ControlError:
    return ControlError(grpc.StatusCode.FAILED_PRECONDITION, message)
