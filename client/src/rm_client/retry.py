"""Retries with exponential backoff and full jitter on the statuses that mean "try again" (gRPC's guidance)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
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
    """Defaults ride out a replica restart: up to 8 attempts over about 10-20 s.

    Retries are also budgeted per client, across its calls (as Finagle's RetryBudget): within any
    `budget_window_s`, at most `budget_min_per_s` x the window plus `budget_ratio` x the calls made. A trainer
    rank making a few calls a step rides out a restart within the floor; a client with thousands of calls in
    flight against a failing service adds at most 20% to its load instead of multiplying it by 8 (the retry
    storm many ranks would otherwise send the moment it comes back)."""

    max_attempts: int = 8
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    multiplier: float = 2.0
    budget_ratio: float = 0.2
    budget_min_per_s: float = 10.0
    budget_window_s: float = 10.0

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)] (spreads a herd of clients)."""
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt))


class RetryBudget:
    """The retries one client may still send (see RetryPolicy): calls and retries of the last window."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_call(self) -> None:
        self._calls.append(time.monotonic())

    def try_retry(self) -> bool:
        now, policy = time.monotonic(), self.policy
        for events in (self._calls, self._retries):
            while events and events[0] < now - policy.budget_window_s:
                events.popleft()
        allowed = policy.budget_min_per_s * policy.budget_window_s + policy.budget_ratio * len(self._calls)
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


async def call_with_retries(
    call: Callable[[float | None], Awaitable[T]],
    policy: RetryPolicy,
    timeout_s: float | None,
    budget: RetryBudget | None = None,
) -> T:
    """Run `call(remaining_timeout)` until it succeeds, fails with a status that is not retryable, runs out
    of attempts or of the client's retry `budget`, or the overall deadline `timeout_s` passes."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if budget is not None:
        budget.record_call()
    for attempt in range(1, policy.max_attempts + 1):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise RewardServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout_s} s passed", attempt - 1
            )
        try:
            return await call(remaining)
        except grpc.RpcError as error:
            pause = retry_pause(error.code(), error.details() or "", attempt, policy, deadline, budget)
        await asyncio.sleep(pause)
    raise AssertionError("unreachable")


def retry_pause(
    code: grpc.StatusCode,
    message: str,
    attempt: int,
    policy: RetryPolicy,
    deadline: float | None,
    budget: RetryBudget | None,
) -> float:
    """Seconds to wait before trying again after attempt number `attempt` failed with `code`; raises
    RewardServiceError when that failure is final (a status not worth retrying, the attempts or the client's
    retry budget spent). The one retry rule of unary calls and streams."""
    if code not in RETRYABLE or attempt == policy.max_attempts:
        raise RewardServiceError(code, message, attempt) from None
    if budget is not None and not budget.try_retry():
        raise RewardServiceError(code, f"{message} (retry budget spent)", attempt) from None
    pause = policy.backoff(attempt - 1)
    if deadline is not None:
        pause = min(pause, max(0.0, deadline - time.monotonic()))
    log.warning("%s (attempt %d of %d); retrying in %.2f s", code.name, attempt, policy.max_attempts, pause)
    return pause
