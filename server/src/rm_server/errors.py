"""The domain errors every wing may raise and each transport maps to its own statuses.

A caller can always tell bad input from overload, a server that is not ready and a failure on our side:
each transport (gRPC, HTTP) keeps one table from these classes to its statuses. `status` is the error's
canonical status name (google.rpc.Code), the label the request metrics count it under on every transport.
"""

from __future__ import annotations


class RewardServiceError(Exception):
    status = "INTERNAL"


class InvalidRequest(RewardServiceError):
    """Bad input; the message names the sample index where there is one, `field` the request field."""

    status = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ModelNotFound(RewardServiceError):
    """The request names a model or version the server does not hold."""

    status = "NOT_FOUND"


class AdminDisabled(RewardServiceError):
    """An admin call on a server that has no token (or nothing to administer)."""

    status = "PERMISSION_DENIED"


class QueueFull(RewardServiceError):
    """No room for the request's samples: the caller should back off and retry."""

    status = "RESOURCE_EXHAUSTED"


class NotReady(RewardServiceError):
    """The model is not loaded and warmed up yet, or the server is shutting down."""

    status = "UNAVAILABLE"


class TokenizationFailed(RewardServiceError):
    """Tokenizer processes died twice holding this request's samples: a retry would likely kill them again."""


class InferenceFailed(RewardServiceError):
    """The engine failed on a batch; only the requests in that batch get this."""


class InternalError(RewardServiceError):
    """Anything unexpected; its message carries the request id that the server logged with the traceback."""
