"""Reward functions for TRL's online trainers (GRPOTrainer, RLOOTrainer): `reward_funcs=[ServiceReward(...)]`.

TRL calls a reward function with `prompts`, `completions` (strings, or chat messages in conversational
datasets) and extra columns as keyword arguments, and expects one float per completion. The async form
lets TRL overlap the service call with its other reward functions.

`on_failure`: "raise" (default) stops training when the service cannot score a batch (after the client's
retries), so no step ever trains on missing rewards. "none" returns None for every completion of that batch
instead, which TRL reads as "this reward function does not apply": the step goes on with the other reward
functions, or, with this one alone, with those completions' rewards missing (TRL warns) -- a run that
survives an outage at the price of steps trained on fewer rewards. A warning is logged each time.

Other keyword arguments go to the client (`RewardClient`, `AsyncRewardClient`). Without `security=`, calls
carry the bearer token of the RM_AUTH_TOKEN environment variable (or RM_TOKEN) when one is set, the name
rm-serve reads its own token from (`rm_client.read_token`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from rm_client.channel import Security, read_token
from rm_client.client import AsyncRewardClient, RewardClient
from rm_client.errors import RewardServiceError

log = logging.getLogger(__name__)
ON_FAILURE = ("raise", "none")


def _on_failure(value: str) -> str:
    if value not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}, not {value!r}")
    return value


class _RewardFunction:
    """What both forms share: the name TRL logs, normalization, and what a failed batch returns."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        normalize: bool = False,
        name: str = "rewardserve",
        on_failure: str = "raise",
        **options,
    ):
        self.__name__ = name  # TRL logs each reward function's mean under its name
        self.normalize, self.on_failure = normalize, _on_failure(on_failure)
        if "security" not in options:
            options["security"] = Security(token=read_token())
        self._target, self._options = target, options

    def _missing(self, error: RewardServiceError, n: int) -> list[None]:
        if self.on_failure == "raise":
            raise error
        log.warning("reward service failed (%s); returning None for %d completions", error, n)
        return [None] * n


class ServiceReward(_RewardFunction):
    """Blocking reward function backed by a reward service."""

    def __init__(self, target: str | Sequence[str], **kwargs: Any):
        super().__init__(target, **kwargs)
        self._client = RewardClient(target, **self._options)

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float | None]:
        try:
            return self._client.score_completions(prompts, completions, normalize=self.normalize).tolist()
        except RewardServiceError as error:
            return self._missing(error, len(completions))

    def close(self) -> None:
        self._client.close()


class AsyncServiceReward(_RewardFunction):
    """Async reward function; its client is opened in the event loop TRL calls it from."""

    _client: AsyncRewardClient | None = None

    async def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float | None]:
        if self._client is None:
            self._client = AsyncRewardClient(self._target, **self._options)
        try:
            rewards = await self._client.score_completions(prompts, completions, normalize=self.normalize)
        except RewardServiceError as error:
            return self._missing(error, len(completions))
        return rewards.tolist()
