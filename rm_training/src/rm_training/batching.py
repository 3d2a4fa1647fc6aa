"""Tokenized preference groups, padded batches, and batched scoring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rm_contract.padding import pad_batch
from rm_contract.recipe import SampleEncoder
from rm_contract.records import PreferenceGroup, PreferencePair
from rm_training.progress import bar


@dataclass(frozen=True)
class TokenizedGroup:
    ids: tuple[tuple[int, ...], ...]
    """One id sequence per response of the group."""
    pairs: tuple[PreferencePair, ...]
    n_truncated: int


@dataclass
class PairBatch:
    """Every response of some groups in one padded batch, so one forward scores both sides of each pair."""

    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T)
    chosen: torch.Tensor  # (P,) row of the chosen response
    rejected: torch.Tensor  # (P,)
    margin: torch.Tensor  # (P,)
    group: torch.Tensor  # (P,) which group each pair belongs to
    n_groups: int

    def to(self, device: torch.device) -> PairBatch:
        tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PairBatch(**tensors)


def tokenize_groups(
    groups: list[PreferenceGroup], encoder: SampleEncoder, desc: str = "tokenize"
) -> list[TokenizedGroup]:
    tokenized = []
    for group in bar(groups, desc=desc, leave=False):
        encoded = [encoder.encode(sample) for sample in group.samples]
        tokenized.append(
            TokenizedGroup(
                ids=tuple(tuple(e.ids) for e in encoded),
                pairs=group.pairs,
                n_truncated=sum(e.truncated for e in encoded),
            )
        )
    return tokenized


def pad(
    sequences: list[tuple[int, ...]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id sequences to the longest one, as the server does: (input_ids, attention_mask), both (B, T)."""
    input_ids, attention_mask = pad_batch(sequences, pad_id, padding_side)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def collate(groups: list[TokenizedGroup], pad_id: int) -> PairBatch:
    sequences, chosen, rejected, margin, group_of_pair = [], [], [], [], []
    for g, group in enumerate(groups):
        offset = len(sequences)
        sequences += group.ids
        for pair in group.pairs:
            chosen.append(offset + pair.chosen)
            rejected.append(offset + pair.rejected)
            margin.append(pair.margin)
            group_of_pair.append(g)
    input_ids, attention_mask = pad(sequences, pad_id)
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        chosen=torch.tensor(chosen),
        rejected=torch.tensor(rejected),
        margin=torch.tensor(margin, dtype=torch.float32),
        group=torch.tensor(group_of_pair),
        n_groups=len(groups),
    )


def pair_rows(groups: list[TokenizedGroup]) -> tuple[list[int], list[int], list[float]]:
    """Rows of each pair's chosen and rejected response in the groups' flattened sequences, and margins."""
    chosen, rejected, margin, offset = [], [], [], 0
    for g in groups:
        chosen += [offset + p.chosen for p in g.pairs]
        rejected += [offset + p.rejected for p in g.pairs]
        margin += [p.margin for p in g.pairs]
        offset += len(g.ids)
    return chosen, rejected, margin


def score_by_length(
    score, sequences: list[tuple[int, ...]], batch_size: int, desc: str | None = None, max_tokens: int | None = None
) -> np.ndarray:
    """Rewards (N,) in input order from `score(list of id sequences) -> rewards`; batches are length-sorted
    to waste little padding, and hold at most `max_tokens` padded tokens where given."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rewards = np.empty(len(sequences), dtype=np.float32)
    batches = bounded_batches(order, [len(s) for s in sequences], batch_size, max_tokens)
    for rows in bar(batches, desc=desc, leave=False, disable=desc is None):
        rewards[rows] = np.asarray(score([sequences[i] for i in rows]), dtype=np.float32)
    return rewards


def bounded_batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """`order` cut into consecutive batches of at most `batch_size` rows and, where given, `max_tokens`
    padded tokens (a batch takes fewer rows when a long sequence is in it; one row at least)."""
    batches: list[list[int]] = []
    rows: list[int] = []
    longest = 0
    for i in order:
        padded = (len(rows) + 1) * max(longest, lengths[i])  # this batch's tokens with `i` in it
        if rows and (len(rows) == batch_size or (max_tokens and padded > max_tokens)):
            batches.append(rows)
            rows, longest = [], 0
        rows.append(i)
        longest = max(longest, lengths[i])
    return batches + [rows] if rows else batches


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, sequences: list[tuple[int, ...]], pad_id: int, batch_size: int, desc: str = "score"
) -> torch.Tensor:
    """Rewards (N,) of a PyTorch reward model, in input order."""
    device = next(model.parameters()).device

    def score(batch: list[tuple[int, ...]]) -> np.ndarray:
        input_ids, attention_mask = pad(batch, pad_id)
        return model(input_ids.to(device), attention_mask.to(device)).float().cpu().numpy()

    return torch.from_numpy(score_by_length(score, sequences, batch_size, desc))
