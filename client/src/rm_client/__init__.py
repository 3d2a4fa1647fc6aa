"""rewardserve client: score with a reward service over gRPC (see rm_client.client)."""

from rm_client.channel import Security, read_token
from rm_client.client import AsyncRewardClient, Comparison, Ranking, RewardClient
from rm_client.errors import RewardServiceError
from rm_client.retry import RetryPolicy

__all__ = [
    "AsyncRewardClient",
    "Comparison",
    "Ranking",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "Security",
    "read_token",
]
