"""PPO arithmetic against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rm_client.ppo import core
from rm_client.ppo.rollout import response_mask_until_eos

T = torch.tensor


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=0)


def test_kl_estimators():
    logp, ref = T([[-1.0, -2.0]]), T([[-1.5, -2.0]])
    close(core.kl_per_token(logp, ref, "k1"), [[0.5, 0.0]])
    close(core.kl_per_token(logp, ref, "k3"), [[math.exp(-0.5) - 1 + 0.5, 0.0]])
    assert core.kl_per_token(T([[-2.0]]), T([[-1.0]]), "k3").item() > 0  # k3 is never negative
    with pytest.raises(ValueError, match="k2"):
        core.kl_per_token(logp, ref, "k2")


def test_score_lands_on_the_last_real_token_and_kl_everywhere_else():
    scores = T([2.0, 1.0])
    kl = T([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second response: EOS at position 1, then padding
    rewards, non_score = core.per_token_rewards(scores, kl, mask, beta=0.5)
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]])
    close(rewards, [[-0.05, -0.1, 1.85], [-0.2, 0.75, 0.0]])


def test_gae_by_hand():
    advantages, returns = core.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=1.0, lam=0.9)
    close(advantages, [[0.433, 0.37, 0.3]])
    close(returns, [[0.933, 0.97, 1.0]])
    # padding after the last real token: its value is ignored and its advantage is 0
    advantages, _ = core.gae(T([[0.0, 1.0, 0.0]]), T([[0.5, 0.6, 9.9]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.4, 0.0]])
    advantages, _ = core.gae(T([[0.0, 1.0]]), T([[0.0, 0.0]]), torch.ones(1, 2), gamma=0.5, lam=1.0)
    close(advantages, [[0.5, 1.0]])


def test_clipped_policy_loss():
    logprobs = T([[math.log(1.5), 0.0]])
    loss, clip_fraction, approx_kl = core.policy_loss(
        logprobs, T([[0.0, 0.0]]), T([[1.0, -1.0]]), torch.ones(1, 2), 0.2
    )
    # token 0: ratio 1.5, A=1 -> max(-1.5, -1.2) = -1.2 (clipped); token 1: ratio 1, A=-1 -> 1
    assert loss.item() == pytest.approx(-0.1)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.25 * math.log(1.5) ** 2)
    padded, *_ = core.policy_loss(logprobs, T([[0.0, 0.0]]), T([[1.0, -1.0]]), T([[1.0, 0.0]]), 0.2)
    assert padded.item() == pytest.approx(-1.2)


def test_clipped_value_loss():
    loss, clip_fraction = core.value_loss(T([[1.0]]), T([[0.5]]), T([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.7 - 2.0) ** 2)  # the clipped value (0.7) is further off
    assert clip_fraction.item() == 1.0
    loss, clip_fraction = core.value_loss(T([[0.6]]), T([[0.5]]), T([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * 1.4**2) and clip_fraction.item() == 0.0


def test_adaptive_kl_controller():
    controller = core.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert controller.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # error clipped at 0.2
    controller = core.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert controller.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    assert core.FixedKLController(0.3).update(100.0, 10) == 0.3


def test_whitening_and_running_moments():
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    whitened = core.masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), mask)
    close(whitened, [[-1.0, 0.0, 1.0, 0.0]])  # the unbiased std of 1, 2, 3 is 1
    moments = core.RunningMoments()
    moments.update(T([1.0, 3.0]))
    moments.update(T([5.0, 7.0]))
    assert moments.mean == pytest.approx(4.0, abs=1e-3) and moments.std == pytest.approx(math.sqrt(5.0), abs=1e-3)


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eos():
    mask, has_eos = response_mask_until_eos(T([[5, 2, 2], [5, 6, 7], [2, 9, 9]]), eos_id=2)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
