"""The one error type the control layer raises: a gRPC status code and one sentence.

Everything below the servicer raises :class:`ControlError`; the servicer turns
it into a gRPC status. Any other exception is a bug: the servicer logs it and
answers INTERNAL with a generic sentence (never UNKNOWN, never a traceback).
"""

from __future__ import annotations

import grpc


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(uid: str) -> ControlError:
    return ControlError(grpc.StatusCode.NOT_FOUND, f"no session with uid {uid!r} on this gateway")


def invalid(message: str) -> ControlError:
    return ControlError(grpc.StatusCode.INVALID_ARGUMENT, message)


def precondition(message: str) -> ControlError:
    return ControlError(grpc.StatusCode.FAILED_PRECONDITION, message)
