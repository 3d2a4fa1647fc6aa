"""Process-reward rows as model input: tokenized solutions, padded batches with a label at each step token,
and held-out evaluation.

Each row is encoded as the server encodes a request's steps (`SampleEncoder.encode(Sample.from_steps(...))`),
so a step's label sits on the very token whose score the server returns for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rm_contract.recipe import RecipeError, Sample, SampleEncoder
from rm_contract.records import DataError, StepSolution
from rm_training.batching import bounded_batches, pad
from rm_training.prm_metrics import IGNORE_INDEX, step_metrics, step_targets
from rm_training.progress import bar


@dataclass(frozen=True)
class TokenizedSolution:
    ids: tuple[int, ...]
    steps: tuple[int, ...]
    """Index in `ids` of each step's step token, where its label and score sit."""
    labels: tuple[bool, ...]
    truncated: bool


def tokenize_solutions(
    solutions: list[StepSolution], encoder: SampleEncoder, desc: str = "tokenize"
) -> tuple[list[TokenizedSolution], list[str]]:
    """The solutions the input recipe accepts, and why each other one was refused (`file:line: reason`):
    a row too long for the model, or a step holding the step token, is skipped rather than fatal."""
    tokenized, refused = [], []
    for solution in bar(solutions, desc=desc, leave=False):
        try:
            encoded = encoder.encode(Sample.from_steps(solution.prompt, solution.steps))
        except RecipeError as e:
            refused.append(f"{solution.where}: {e}")
            continue
        tokenized.append(TokenizedSolution(tuple(encoded.ids), encoded.steps, solution.labels, encoded.truncated))
    if not tokenized:
        raise DataError(f"the input recipe refuses all {len(solutions)} rows, as in {refused[0]}")
    return tokenized, refused


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) class at each step token, IGNORE_INDEX elsewhere

    def to(self, device: torch.device) -> StepBatch:
        return StepBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.targets)))


def collate_steps(solutions: list[TokenizedSolution], pad_id: int, last_step_only: bool = False) -> StepBatch:
    input_ids, attention_mask = pad([s.ids for s in solutions], pad_id)
    targets = torch.full(input_ids.shape, IGNORE_INDEX, dtype=torch.long)
    for row, solution in enumerate(solutions):
        targets[row, list(solution.steps)] = torch.tensor(step_targets(solution.labels, last_step_only))
    return StepBatch(input_ids, attention_mask, targets)


@torch.no_grad()
def score_steps(
    model: torch.nn.Module, solutions: list[TokenizedSolution], pad_id: int, batch_size: int, desc: str = "score"
) -> list[np.ndarray]:
    """P(correct) of every step (one array per solution, in input order); batches are length-sorted."""
    device = next(model.parameters()).device
    order = sorted(range(len(solutions)), key=lambda i: len(solutions[i].ids))
    scores: list[np.ndarray] = [np.empty(0)] * len(solutions)
    for rows in bar(bounded_batches(order, [len(s.ids) for s in solutions], batch_size, None), desc=desc, leave=False):
        input_ids, attention_mask = pad([solutions[i].ids for i in rows], pad_id)
        probs = model(input_ids.to(device), attention_mask.to(device)).float().cpu().numpy()  # (B, T)
        for row, i in enumerate(rows):
            scores[i] = probs[row, list(solutions[i].steps)]
    return scores


def evaluate_solutions(
    model: torch.nn.Module, solutions: list[TokenizedSolution], pad_id: int, batch_size: int = 32
) -> dict:
    """Step accuracy, first-error accuracy, AUROC and loss over every step of the held-out solutions."""
    was_training = model.training
    model.eval()
    probs = score_steps(model, solutions, pad_id, batch_size, desc="eval")
    model.train(was_training)
    return step_metrics(probs, [np.array(s.labels, dtype=bool) for s in solutions])
