"""Reward functions for TRL's online trainers (GRPOTrainer, RLOOTrainer): `reward_funcs=[ServiceReward(...)]`.

TRL calls a reward function with `prompts`, `completions` (strings, or chat messages in conversational
datasets) and extra columns as keyword arguments, and expects one float per completion. The async form
lets TRL overlap the service call with its other reward functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rm_client.client import AsyncRewardClient, RewardClient


class ServiceReward:
    """Blocking reward function backed by a reward service."""

    def __init__(self, target: str | Sequence[str], *, normalize: bool = False, name: str = "rewardserve", **options):
        self.__name__ = name  # TRL logs each reward function's mean under its name
        self.normalize = normalize
        self._client = RewardClient(target, **options)

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
        return self._client.score_completions(prompts, completions, normalize=self.normalize).tolist()

    def close(self) -> None:
        self._client.close()


class AsyncServiceReward:
    """Async reward function; its client is opened in the event loop TRL calls it from."""

    def __init__(self, target: str | Sequence[str], *, normalize: bool = False, name: str = "rewardserve", **options):
        self.__name__ = name
        self.normalize = normalize
        self._target, self._options = target, options
        self._client: AsyncRewardClient | None = None

    async def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
        if self._client is None:
            self._client = AsyncRewardClient(self._target, **self._options)
        rewards = await self._client.score_completions(prompts, completions, normalize=self.normalize)
        return rewards.tolist()
