"""Loss and metric values against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rm_training.losses import bradley_terry_loss, mean_per_group, pairwise_accuracy, reward_model_loss


def test_bradley_terry_loss_matches_hand_computed_values():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0]))
    expected = [math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)


def test_margin_is_subtracted_from_the_reward_difference():
    loss = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=torch.tensor([2.0]))
    assert loss.item() == pytest.approx(math.log(2.0))


def test_k_way_pairs_are_averaged_per_prompt():
    # group 0 has 3 pairs with losses 1, 2, 3 (mean 2); group 1 one pair with loss 4 -> mean over groups 3
    per_pair = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert mean_per_group(per_pair, torch.tensor([0, 0, 0, 1]), 2).tolist() == [2.0, 4.0]


def test_reward_model_loss_with_centering_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0])  # group 0: pairs (0>1), (0>2), (2>1); group 1 would be separate
    chosen, rejected = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 1])
    margin = torch.zeros(3)
    group = torch.zeros(3, dtype=torch.long)
    bt = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0)), math.log(1 + math.exp(-2.0))]
    center = [(1.0 + 0.0) ** 2, (1.0 + 2.0) ** 2, (2.0 + 0.0) ** 2]
    expected = sum(b + 0.1 * c for b, c in zip(bt, center)) / 3
    loss = reward_model_loss(rewards, chosen, rejected, margin, group, 1, center_coefficient=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(torch.tensor([1.0, 0.5, 2.0, 0.0]), torch.tensor([0.0, 0.5, 3.0, -1.0])) == 0.5
