"""A process reward model's export checks: every step's score, ONNX against PyTorch and batched against alone.

The same gates as a sequence reward model's (rm_training.parity), per step: parity compares each step's
P(correct) from ONNX Runtime with PyTorch's forward of its sample alone and unpadded; batch invariance
compares packed batches of mixed lengths (shared prompts too, for decoders) and one-sample rows against
each sample alone. Probabilities are on a scale of 1, so the tolerances are absolute.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from rm_contract.packing import StepIds, pack_batch
from rm_contract.padding import pad_batch
from rm_contract.recipe import RecipeError, Sample, SampleEncoder
from rm_server.runtime.engine import OnnxEngine
from rm_training.batching import bounded_batches
from rm_training.parity import BATCH_SIZES, MAX_BATCH_TOKENS, VerificationSet
from rm_training.step_model import StepRewardModel

BUILTIN_SOLUTIONS = [
    ("Compute (3 + 4) * 2.", ["3 + 4 = 7", "7 * 2 = 14", "The answer is 14."]),
    ("Compute (3 + 4) * 2.", ["3 + 4 = 8", "8 * 2 = 16", "The answer is 16."]),
    ("Compute (3 + 4) * 2.", ["3 + 4 = 7", "7 * 2 = 15", "The answer is 15."]),
    ("What is 12 - 5?", ["12 - 5 = 7"]),
    ("Add the numbers 1, 2, 3 and 4.", ["1 + 2 = 3", "3 + 3 = 6", "6 + 4 = 10", "The sum is 10."]),
    ("", ["A solution with no prompt at all."]),
    ("Halve 30, then add 9.", ["30 / 2 = 15", "15 + 9 = 24"]),
    ("Is 17 prime?", ["17 is not divisible by 2, 3 or 4.", "So 17 is prime."]),
    ("Compute (5 + 6) * 3.", ["5 + 6 = 11", "11 * 3 = 33", "The answer is 33."]),
    ("Compute (5 + 6) * 3.", ["5 + 6 = 11", "11 * 3 = 34", "The answer is 34."]),
]
"""Solutions of 1-4 steps; shared prompts, and two solutions sharing their first step: a decoder computing a
shared prefix once reads that step's score inside the prefix."""


def step_verification_samples(encoder: SampleEncoder, extra: list[Sample] = ()) -> list[StepIds]:
    """The built-in solutions, `extra` ones (eval rows), and one at the maximum length (a long prompt, cut)."""
    samples = [Sample.from_steps(p, s) for p, s in BUILTIN_SOLUTIONS] + list(extra)
    filler = " ".join(" ".join(s) for _, s in BUILTIN_SOLUTIONS)
    samples.append(Sample.from_steps(filler * (1 + encoder.recipe.max_length // 50), BUILTIN_SOLUTIONS[0][1]))
    encoded = []
    for sample in samples:
        try:
            one = encoder.encode(sample)
        except RecipeError:  # an eval row too long for the model: rm-train skipped it too
            continue
        encoded.append(StepIds(one.ids, one.steps))
    assert len(encoded[-1]) == encoder.recipe.max_length, "the long sample must reach the maximum length"
    return encoded


@torch.no_grad()
def reference_step_scores(model: StepRewardModel, samples: list[StepIds]) -> np.ndarray:
    """PyTorch's P(correct) at every step of each sample alone and unpadded, concatenated in order."""
    scores = []
    for ids in samples:
        input_ids = torch.tensor([list(ids)])
        scores.append(model(input_ids, torch.ones_like(input_ids))[0, list(ids.steps)].double().numpy())
    return np.concatenate(scores)


def packed_step_scores(
    engine: OnnxEngine, samples: list[StepIds], batch_size: int, seed: int, packed: bool, share: bool = False
) -> np.ndarray:
    """Step scores from shuffled batches (packed rows of mixed lengths, or one sample per row), returned
    concatenated in input order."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    scores: list[np.ndarray] = [np.empty(0)] * len(samples)
    for rows in bounded_batches(order, [len(s) for s in samples], batch_size, MAX_BATCH_TOKENS):
        chosen = [samples[i] for i in rows]
        width = sum(map(len, chosen)) if share else None
        batch = pack_batch(chosen, engine.scoring, packed=packed, width=width, share_prefixes=share)
        flat = engine.score_packed(batch)
        for i, part in zip(rows, np.split(flat, np.cumsum(batch.counts)[:-1])):
            scores[i] = part
    return np.concatenate(scores).astype(np.float64)


def check_step_variant(engine: OnnxEngine, vset: VerificationSet, pad_id: int, packing: bool) -> tuple[dict, list]:
    """Worst per-step parity against PyTorch and worst batched-vs-alone difference; and each sample's score at
    the token the server's load check reads (`Bundle.reference_mismatch`: the last token, a decoder's last
    step; an encoder's first), which rm-export records as the reference rewards."""
    samples: list[StepIds] = vset.ids  # type: ignore[assignment]
    alone = packed_step_scores(engine, samples, 1, seed=0, packed=False)
    batches = [packed_step_scores(engine, samples, n, seed=i, packed=False) for i, n in enumerate(BATCH_SIZES[1:])]
    if packing:
        for i, n in enumerate(BATCH_SIZES[1:]):
            batches.append(packed_step_scores(engine, samples, n, seed=i, packed=True))
            if engine.scoring.shares_prefixes:
                batches.append(packed_step_scores(engine, samples, n, seed=i, packed=True, share=True))
    parity = max(float(np.abs(r - vset.reference).max()) for r in [alone, *batches])
    invariance = max(float(np.abs(r - alone).max()) for r in batches)
    load_check = [float(engine.score(*pad_batch([list(ids)], pad_id))[0]) for ids in samples]
    result = {"parity_max_abs_diff": parity, "batch_invariance_max_abs_diff": invariance, "n_steps": len(alone)}
    return result, load_check
