"""The one exception the client raises, carrying the gRPC status and the server's message."""

from __future__ import annotations

import grpc


class RewardServiceError(Exception):
    """A call failed for good (after retries where they apply). Never replaced by a made-up reward."""

    def __init__(self, code: grpc.StatusCode, message: str, attempts: int = 1):
        self.code = code
        self.message = message
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{code.name}{tries}: {message}")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, attempts: int = 1) -> RewardServiceError:
        return cls(error.code(), error.details() or "", attempts)
