"""The HTTP transport's table from domain errors to HTTP statuses (each API shapes the body its callers read)."""

from __future__ import annotations

from rm_server import errors

STATUS = {
    errors.InvalidRequest: 400,
    errors.ModelNotFound: 404,
    errors.AdminDisabled: 403,
    errors.QueueFull: 503,
    errors.NotReady: 503,
}


def http_status(error: errors.RewardServiceError) -> int:
    """The most specific class listed wins; anything else (tokenization, inference, internal) is 500."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500
