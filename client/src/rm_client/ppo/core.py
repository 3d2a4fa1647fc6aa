"""PPO arithmetic on padded (batch, response tokens) tensors: KL estimators, per-token rewards, GAE, losses.

Conventions: `mask` is 1 on real response tokens (up to and including EOS) and 0 on padding after them;
every function is pure (tensors in, tensors out) so the unit tests check them against hand-computed numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean, unit variance over the real tokens (unbiased variance, as TRL)."""
    mean = masked_mean(values, mask)
    centered = values - mean
    variance = masked_mean(centered**2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1 and k3).

    k1 = logp - logp_ref (unbiased, can be negative); k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp)
    (unbiased, never negative, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * kl_t on every real token, plus the sequence's score on its last real token.

    Returns (rewards, non_score_rewards), both (batch, tokens) and zero on padding."""
    non_score = -beta * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(len(scores)), last] += scores * (mask.sum(dim=1) > 0)
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each response (value 0 after the last real token).

    Returns (advantages, returns) with returns = advantages + values."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1-eps, 1+eps)).

    Returns (loss, clip fraction, approximate KL old -> new as 0.5 * mean (log r)^2)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean max((v - R)^2, (clip(v, v_old +- eps) - R)^2). Returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1, -0.2, 0.2),
    with K_beta = n_steps / horizon (n_steps: samples in the batch)."""

    beta: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


@dataclass
class FixedKLController:
    beta: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta


class RunningMoments:
    """Running mean and std of scores (Chan et al. parallel update), for reward whitening across steps."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, values: torch.Tensor) -> None:
        batch_mean, batch_var, n = values.mean().item(), values.var(unbiased=False).item(), values.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))
