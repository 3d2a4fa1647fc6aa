"""gRPC's table from domain errors to status codes (each transport keeps its own)."""

from __future__ import annotations

import grpc

from rm_server import errors

STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.AdminDisabled: grpc.StatusCode.PERMISSION_DENIED,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: errors.RewardServiceError) -> grpc.StatusCode:
    """The most specific class listed wins; anything else (tokenization, inference, internal) is INTERNAL."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return grpc.StatusCode.INTERNAL
