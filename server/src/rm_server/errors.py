"""Domain errors and the one table that maps them to gRPC status codes.

A caller can always tell bad input (INVALID_ARGUMENT) from overload (RESOURCE_EXHAUSTED), a server that
is not ready (UNAVAILABLE) and a failure on our side (INTERNAL).
"""

from __future__ import annotations

import grpc


class RewardServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidRequest(RewardServiceError):
    """Bad input; the message names the sample index where there is one."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(RewardServiceError):
    """The request names a model or version the server does not hold."""

    code = grpc.StatusCode.NOT_FOUND


class AdminDisabled(RewardServiceError):
    """An admin call on a server that has no token (or nothing to administer)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class QueueFull(RewardServiceError):
    """The batcher's queue has no room: the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(RewardServiceError):
    """The model is not loaded and warmed up yet, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class TokenizationFailed(RewardServiceError):
    """Tokenizer processes died twice holding this request's samples: a retry would likely kill them again."""

    code = grpc.StatusCode.INTERNAL


class InferenceFailed(RewardServiceError):
    """The engine failed on a batch; only the requests in that batch get this."""

    code = grpc.StatusCode.INTERNAL


def status_of(error: BaseException) -> grpc.StatusCode:
    return error.code if isinstance(error, RewardServiceError) else grpc.StatusCode.INTERNAL
