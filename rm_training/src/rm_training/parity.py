"""Checks that a bundle scores what the PyTorch checkpoint scores, whatever the batch and padding.

- parity: ONNX Runtime rewards of padded batches of several sizes against PyTorch's reward of each sample
  alone and unpadded (transformers' own forward for checkpoints trained elsewhere);
- batch invariance: ONNX Runtime batched (mixed lengths, right and left padding) against one by one;
- accuracy: pairwise accuracy on the eval pairs for PyTorch and for every variant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from rm_contract.packing import pack_batch
from rm_contract.padding import pad_batch
from rm_contract.recipe import Sample, SampleEncoder
from rm_server.runtime.engine import OnnxEngine
from rm_training.batching import TokenizedGroup, bounded_batches, pad, pair_rows, score_by_length
from rm_training.model import RewardModel

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
"""Largest parity difference allowed, relative to the reward scale (int8 is judged by accuracy)."""
BATCH_INVARIANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-4}
"""Largest batched-vs-alone difference allowed, relative to the reward scale, for every variant: static int8
is batch-invariant (integer products, fixed scales); a batch-dependent int8 (dynamic quantization picks
activation scales per batch, padding included) is refused."""
MAX_INT8_ACCURACY_DROP = 0.01
REFERENCE_SAMPLES = 8
BATCH_SIZES = (1, 3, 8, 16)
MAX_BATCH_TOKENS = 8192
"""Padded tokens per checking batch: 16 samples of 2,048 tokens in an eager-attention graph held 14 GB of
attention scores on a 0.6B model; a batch holding a long sample takes fewer rows instead."""

BUILTIN_TEXTS = [
    ("How was your stay?", "Wonderful. The staff were kind and the room was spotless."),
    ("Review the new phone.", "The battery dies by noon, the screen scratches easily and support never answered."),
    ("What do you think of the cafe?", "OK"),
    ("Describe your weekend.", "We hiked up to the lake on Saturday, cooked dinner with friends, and slept late."),
    ("Tell me about the concert.", "Loud."),
    ("Would you recommend the gym?", "Only if you like broken machines, dirty showers and rude trainers at the desk."),
    ("", "An answer with no prompt at all."),
    ("Summarize the book in one line.", "A quiet story about a lighthouse keeper who learns to let people in."),
]


@dataclass
class VerificationSet:
    ids: list[list[int]]
    """Encoded samples of varied lengths, one at the maximum length and one with a one-token response."""
    reference: np.ndarray
    """PyTorch reward of each sample alone, unpadded (B,)."""


def verification_samples(groups_samples: list[Sample], encoder: SampleEncoder, n: int = 40) -> list[list[int]]:
    """Real samples spread over the length range, plus the edge cases: maximum length, one-token response."""
    samples = [Sample.from_text(p, r) for p, r in BUILTIN_TEXTS]
    filler = " ".join(p + " " + r for p, r in BUILTIN_TEXTS)  # about 150 tokens
    longest = Sample.from_text(filler * (1 + encoder.recipe.max_length // 100), BUILTIN_TEXTS[0][1])
    encoded = sorted({tuple(encoder.encode(s).ids) for s in groups_samples}, key=len)
    if len(encoded) > n:
        encoded = [encoded[round(i * (len(encoded) - 1) / (n - 1))] for i in range(n)]
    edge = [encoder.encode(s).ids for s in samples + [longest]]
    assert len(edge[-1]) == encoder.recipe.max_length, "the long sample must reach the maximum length"
    return [list(ids) for ids in encoded] + edge


@torch.no_grad()
def reference_rewards(model: RewardModel, sequences: list[list[int]]) -> np.ndarray:
    """Each sample alone and unpadded; transformers' own forward when its pooling rule is the one exported."""
    rewards = []
    for ids in sequences:
        input_ids = torch.tensor([ids])
        if model.pooling == "last_non_pad":
            rewards.append(model.model(input_ids=input_ids).logits[0, 0].item())
        else:
            rewards.append(model(input_ids, torch.ones_like(input_ids)).item())
    return np.array(rewards, dtype=np.float64)


def batched_rewards(
    engine: OnnxEngine, sequences: list[list[int]], pad_id: int, batch_size: int, side: str, seed: int
) -> np.ndarray:
    """Rewards from shuffled (so mixed-length) padded batches, returned in input order."""
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    rewards = np.empty(len(sequences))
    for rows in bounded_batches(order, [len(s) for s in sequences], batch_size, MAX_BATCH_TOKENS):
        rewards[rows] = engine.score(*pad_batch([sequences[i] for i in rows], pad_id, side))
    return rewards


def packed_rewards(
    engine: OnnxEngine, sequences: list[list[int]], batch_size: int, seed: int, share_prefixes: bool = False
) -> np.ndarray:
    """Rewards from shuffled packed batches (mixed lengths sharing rows; with `share_prefixes`, samples with
    a common prefix computing it once), returned in input order."""
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    rewards = np.empty(len(sequences))
    for rows in bounded_batches(order, [len(s) for s in sequences], batch_size, MAX_BATCH_TOKENS):
        chosen = [sequences[i] for i in rows]
        width = sum(map(len, chosen)) if share_prefixes else None  # room for a prefix shared by all
        batch = pack_batch(chosen, engine.scoring, width=width, share_prefixes=share_prefixes)
        rewards[rows] = engine.score_packed(batch)
    return rewards


def padding_sides(engine: OnnxEngine, sides: tuple[str, ...]) -> tuple[str, ...]:
    """The padding sides worth checking: a packed graph is given each sample unpadded, so every side is the
    same computation and one is checked."""
    return sides[:1] if engine.packed else sides


def check_variant(
    engine: OnnxEngine, vset: VerificationSet, pad_id: int, sides: tuple[str, ...], packing: bool = True
) -> tuple[dict, np.ndarray]:
    """Worst parity difference against PyTorch and worst batched-vs-alone difference in ONNX Runtime (padded
    batches of several sizes; packed ones for a packed graph served `packing`, and for a decoder packed with
    shared prefixes); and the rewards of each sample alone."""
    alone = batched_rewards(engine, vset.ids, pad_id, 1, "right", seed=0)
    batches = [
        batched_rewards(engine, vset.ids, pad_id, batch_size, side, seed=i)
        for side in padding_sides(engine, sides)
        for i, batch_size in enumerate(BATCH_SIZES[1:])
    ]
    if engine.packed and packing:
        for i, batch_size in enumerate(BATCH_SIZES[1:]):
            batches.append(packed_rewards(engine, vset.ids, batch_size, seed=i))
            if engine.scoring.shares_prefixes:
                batches.append(packed_rewards(engine, vset.ids, batch_size, seed=i, share_prefixes=True))
    parity = max(float(np.abs(r - vset.reference).max()) for r in [alone, *batches])
    invariance = max(float(np.abs(r - alone).max()) for r in batches)
    return {"parity_max_abs_diff": parity, "batch_invariance_max_abs_diff": invariance}, alone


def reference_rows(vset: VerificationSet, n: int = REFERENCE_SAMPLES) -> list[int]:
    """Which verification samples go into bundle.json for the server's load check: spread over the
    lengths, the longest included."""
    order = sorted(range(len(vset.ids)), key=lambda i: len(vset.ids[i]))
    return sorted({order[round(k * (len(order) - 1) / (n - 1))] for k in range(n)})


def pairwise_accuracy(score, groups: list[TokenizedGroup], batch_size: int = 32) -> float:
    """Accuracy (ties wrong) of `score(id sequences) -> rewards` on the groups' pairs."""
    rewards = score_by_length(score, [ids for g in groups for ids in g.ids], batch_size, max_tokens=MAX_BATCH_TOKENS)
    chosen, rejected, _ = pair_rows(groups)
    return float((rewards[chosen] > rewards[rejected]).mean())


def torch_scorer(model: RewardModel, pad_id: int):
    @torch.no_grad()
    def score(sequences: list[tuple[int, ...]]) -> np.ndarray:
        return model(*pad(sequences, pad_id)).numpy()

    return score


def onnx_scorer(engine: OnnxEngine, pad_id: int):
    return lambda sequences: engine.score(*pad_batch(sequences, pad_id))
