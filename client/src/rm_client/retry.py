"""Retries with exponential backoff and full jitter on the statuses that mean "try again" (gRPC's guidance)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from rm_client.errors import RewardServiceError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
"""UNAVAILABLE: no replica reachable, or one went away mid-call (scoring is idempotent, so resending is safe).
RESOURCE_EXHAUSTED: the server's queue is full right now. CANCELLED: as a call's status (not our own task
being cancelled, which raises asyncio.CancelledError), it means the server shut down under the call."""


@dataclass(frozen=True)
class RetryPolicy:
    """Defaults ride out a replica restart: up to 8 attempts over about 10-20 s."""

    max_attempts: int = 8
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)] (spreads a herd of clients)."""
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt))


async def call_with_retries(
    call: Callable[[float | None], Awaitable[T]], policy: RetryPolicy, timeout_s: float | None
) -> T:
    """Run `call(remaining_timeout)` until it succeeds, fails with a status that is not retryable, runs out
    of attempts, or the overall deadline `timeout_s` passes."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for attempt in range(1, policy.max_attempts + 1):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise RewardServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout_s} s passed", attempt - 1
            )
        try:
            return await call(remaining)
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == policy.max_attempts:
                raise RewardServiceError.from_rpc_error(error, attempt) from None
            pause = policy.backoff(attempt - 1)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            log.warning(
                "%s (attempt %d of %d); retrying in %.2f s", error.code().name, attempt, policy.max_attempts, pause
            )
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")
