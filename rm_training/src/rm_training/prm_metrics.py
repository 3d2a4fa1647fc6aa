"""Process reward model math: TRL PRMTrainer's token loss and the held-out step metrics (no I/O, no model).

The loss is cross-entropy over two classes (1: the step is correct) at each step token and nowhere else
(IGNORE_INDEX, as transformers' token classifiers skip -100). The metrics read P(correct) per step:
step accuracy at 0.5, first-error accuracy (ProcessBench's question: is the first step scored wrong the
first step that is wrong?) and the AUROC of P(correct) between correct and wrong steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
THRESHOLD = 0.5
"""A step scored P(correct) >= 0.5 is predicted correct."""


def step_targets(labels: Sequence[bool], last_step_only: bool = False) -> list[int]:
    """Class of each step (1: correct); with `last_step_only` (TRL's train_on_last_step_only) only the last
    step's counts and the earlier ones are IGNORE_INDEX."""
    targets = [int(label) for label in labels]
    if last_step_only:
        targets = [IGNORE_INDEX] * (len(targets) - 1) + targets[-1:]
    return targets


def step_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions: logits (B, T, C), targets (B, T) with IGNORE_INDEX
    off the step tokens."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def step_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """The same loss from probabilities (N,) and labels (N,), clipped so a saturated score stays finite."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(labels, np.log(p), np.log1p(-p))))


def step_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((probs >= THRESHOLD) == labels))


def first_error(correct: Sequence[bool]) -> int | None:
    """Index of the first step that is (or is predicted) wrong; None when every step is right."""
    return next((k for k, ok in enumerate(correct) if not ok), None)


def first_error_accuracy(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float | None:
    """Over the solutions with a wrong step: the share whose first step scored below 0.5 is exactly their
    first wrong step (a solution scored all correct misses). None when no solution has a wrong step."""
    hits = [first_error(p >= THRESHOLD) == first_error(y) for p, y in zip(probs, labels) if first_error(y) is not None]
    return float(np.mean(hits)) if hits else None


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney statistic U / (n_pos * n_neg): the chance that a random
    positive outscores a random negative, ties counted half. None with only one class."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct score's first occurrence
    ranks = (first_rank + (counts - 1) / 2)[group]  # tied scores share their mean rank
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def step_metrics(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict:
    """Every held-out number of a process reward model from P(correct) and the labels, per solution."""
    p, y = np.concatenate(probs), np.concatenate(labels).astype(bool)
    return {
        "step_accuracy": step_accuracy(p, y),
        "first_error_accuracy": first_error_accuracy(probs, labels),
        "step_auroc": auroc(p, y),
        "loss": step_nll(p, y),
        "majority_step_accuracy": float(max(y.mean(), 1 - y.mean())),  # the baseline: always the commoner label
        "n_steps": len(y),
        "n_solutions": len(probs),
        "n_solutions_with_error": sum(first_error(s) is not None for s in labels),
    }
