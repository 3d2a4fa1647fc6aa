"""Pairwise (Bradley-Terry) reward-model loss and metrics: pure tensor math, no I/O.

Shapes: R = rewards of the unique responses in a batch; P = preference pairs; G = preference groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair `-log sigmoid(r_chosen - r_rejected - margin)`, shape (P,)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def centering_penalty(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair `(r_chosen + r_rejected)^2`: pulls rewards towards zero mean (TRL's center_rewards_coefficient)."""
    return (r_chosen + r_rejected) ** 2


def mean_per_group(per_pair: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Average per-pair values within each group, shape (G,): a K-way ranking counts as one prompt."""
    totals = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, group, per_pair)
    counts = torch.bincount(group, minlength=n_groups).to(per_pair.dtype)
    return totals / counts


def reward_model_loss(
    rewards: torch.Tensor,  # (R,)
    chosen: torch.Tensor,  # (P,) indices into rewards
    rejected: torch.Tensor,  # (P,)
    margin: torch.Tensor,  # (P,)
    group: torch.Tensor,  # (P,) group index of each pair
    n_groups: int,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Mean over groups of the group's mean pair loss (Bradley-Terry plus optional centering)."""
    r_chosen, r_rejected = rewards[chosen], rewards[rejected]
    per_pair = bradley_terry_loss(r_chosen, r_rejected, margin)
    if center_coefficient:
        per_pair = per_pair + center_coefficient * centering_penalty(r_chosen, r_rejected)
    return mean_per_group(per_pair, group, n_groups).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen reward is strictly higher: ties count as wrong (RewardBench)."""
    return (r_chosen > r_rejected).float().mean().item()
