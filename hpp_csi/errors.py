"""The one exception the CSI services raise: a gRPC status code and a message a person can act on."""

from __future__ import annotations

import grpc


class CsiError(Exception):
    """Raised where the problem is understood; the RPC layer turns it into the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.ALREADY_EXISTS, message)


def failed_precondition(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def out_of_range(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.OUT_OF_RANGE, message)


def resource_exhausted(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def aborted(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.ABORTED, message)


def unimplemented(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.UNIMPLEMENTED, message)


def internal(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INTERNAL, message)
