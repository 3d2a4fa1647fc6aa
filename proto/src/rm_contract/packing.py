"""How id sequences become one packed batch: several samples share a row, none computes padding.

A packed graph takes, per row of the batch (R, T):
- `input_ids`: the samples' ids one after another, `pad_id` in what is left of the row;
- `position_ids`: restarting at 0 for every sample;
- `group_ids`: which sample (1, 2, ...) each token belongs to, 0 on the row's tail of padding; a token attends
  only to tokens of its own group (and, in a decoder, only to earlier ones);
- `branch_ids`: 0 where a whole sample is one group. Samples sharing a prefix (a GRPO group's prompt) form
  one group: the prefix once as branch 0, visible to every branch; each sample's rest as branch 1, 2, ...,
  which sees branch 0 and itself only, its positions continuing from the prefix's (decoders only);
- `score_positions` (N,): where each sample's reward is read, as an index into the flattened (R * T) batch,
  in the order the rewards come back. A process reward model's sample (`StepIds`) is read at each of its
  steps: its positions follow one another, and `PackedBatch.counts` says how many each sample has.

Without a given layout, rows are as wide as the longest sample of the batch, so a row's attention never
costs more than that sample's padded row did; shorter samples fill rows first-fit by decreasing length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PADDED_INPUTS = ("input_ids", "attention_mask")
PACKED_INPUTS = ("input_ids", "position_ids", "group_ids", "branch_ids", "score_positions")
POOLINGS = ("cls", "last_attended", "last_non_pad")


class StepIds(list):
    """A process reward model's sample: its ids (a list, so batching, packing and caching treat it as any
    sample) and `steps`, the index of each step's step token, where the step's score is read."""

    def __init__(self, ids: Sequence[int], steps: Sequence[int]):
        super().__init__(ids)
        self.steps = tuple(steps)


def scored_indices(ids: Sequence[int], rule: ScoringRule) -> tuple[int, ...]:
    """Where a sample's scores are read: its steps (`StepIds`), else the one token of the bundle's rule."""
    return ids.steps if isinstance(ids, StepIds) else (rule.index(ids),)


@dataclass(frozen=True)
class ScoringRule:
    """Which token of a sample its reward is read at: the bundle's pooling rule. `cls` reads the first
    token (encoders), `last_attended` the last one, `last_non_pad` the last one that is not `pad_id`
    (transformers' rule for checkpoints trained elsewhere, where a trailing pad == eos is skipped)."""

    pooling: str
    pad_id: int

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling rule {self.pooling!r} (expected one of {', '.join(POOLINGS)})")

    @property
    def shares_prefixes(self) -> bool:
        """Decoders only: an encoder's prefix token would see what follows it, so its samples never share."""
        return self.pooling != "cls"

    def index(self, ids: Sequence[int]) -> int:
        """The scored token's index within the sample."""
        if self.pooling == "cls":
            return 0
        if self.pooling == "last_attended":
            return len(ids) - 1
        # transformers: argmax over (not pad) * position, so 0 when every token is pad
        return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != self.pad_id), 0)


@dataclass
class PackedBatch:
    """A packed batch as the graph takes it (see the module's docstring); all int64."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    group_ids: np.ndarray
    branch_ids: np.ndarray
    score_positions: np.ndarray
    counts: np.ndarray
    """Scores per sample (1, or a `StepIds` sample's steps): how the graph's outputs split by sample."""

    def inputs(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in PACKED_INPUTS}

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def size(self) -> int:
        """Tokens computed, padding included (rows x width)."""
        return self.input_ids.size

    @property
    def real_tokens(self) -> int:
        return int((self.group_ids > 0).sum())


MIN_SHARED_PREFIX = 16
"""Samples share their common first ids when at least this many (a chat template's system header alone is
20-30 tokens: different prompts sharing only that would make wide rows for little)."""


def row_cost(width: int, pair_cost: float) -> float:
    """What computing a row of `width` tokens costs, in tokens: each token once, plus `pair_cost` per
    token pair for attention (eager attention computes the whole row's scores, masked or not)."""
    return width + pair_cost * width * width


@dataclass(frozen=True)
class Unit:
    """Samples laid out together in a row: `members` whose first `prefix` ids are computed once, then each
    member's rest as its own branch; one sample when `prefix` is 0."""

    members: tuple[int, ...]
    prefix: int = 0

    def width(self, lengths: Sequence[int]) -> int:
        return self.prefix + sum(lengths[i] - self.prefix for i in self.members)


def pack_rows(lengths: Sequence[int], width: int | None = None) -> list[list[int]]:
    """Item indices per row: first fit by decreasing length into rows of `width` (default: the longest)."""
    width = width or max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def shared_prefix_units(
    sequences: Sequence[Sequence[int]], capacity: int, max_members: int = 1 << 30, pair_cost: float = 0.0
) -> list[Unit]:
    """Samples grouped by common prefixes (decoders only: a prefix token must not see what follows it).

    Sorted by ids, samples with a common prefix are neighbours; a sample joins its neighbour's unit when
    they share at least MIN_SHARED_PREFIX ids, the unit computed as one row costs less than the unit
    without it plus the sample alone (`row_cost`: a shared prompt saves tokens, a wider row costs attention),
    and it still fits a row of `capacity` tokens and `max_members` samples. Every member keeps at least its
    last id in its own branch, where its reward is read."""
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    units: list[Unit] = []
    members, prefix = [order[0]], 0
    for i in order[1:]:
        common = min(_common_prefix(sequences[members[-1]], sequences[i]), len(sequences[i]) - 1)
        shared = min(common, prefix) if prefix else min(common, len(sequences[members[0]]) - 1)
        width = shared + sum(len(sequences[m]) - shared for m in [*members, i])
        before = row_cost(prefix + sum(len(sequences[m]) - prefix for m in members), pair_cost)
        cheaper = row_cost(width, pair_cost) < before + row_cost(len(sequences[i]), pair_cost)
        if shared >= MIN_SHARED_PREFIX and cheaper and width <= capacity and len(members) < max_members:
            members, prefix = [*members, i], shared
        else:
            units.append(Unit(tuple(members), prefix))
            members, prefix = [i], 0
    units.append(Unit(tuple(members), prefix))
    return units


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def pack_batch(
    sequences: Sequence[Sequence[int]],
    rule: ScoringRule,
    packed: bool = True,
    layout: Sequence[Sequence[Unit]] | None = None,
    width: int | None = None,
    share_prefixes: bool = False,
) -> PackedBatch:
    """Sequences -> one packed batch, rewards in input order.

    The rows are `layout` when given (each row's units, as the batcher placed them), else first fit by
    decreasing length (`pack_rows`) into rows of `width` (default: the longest sample); `packed=False` gives
    every sample a row of its own (the padded layout in the packed form: what `--no-packing` serves).
    `share_prefixes` (decoders) first groups samples with a common prefix into units (`shared_prefix_units`)
    that compute it once."""
    lengths = [len(s) for s in sequences]
    if layout is not None:
        rows = [list(row) for row in layout]
    elif share_prefixes:
        capacity = max(width or 0, *lengths)
        units = shared_prefix_units(sequences, capacity)
        rows = [[units[u] for u in row] for row in pack_rows([u.width(lengths) for u in units], capacity)]
    elif packed:
        rows = [[Unit((i,)) for i in row] for row in pack_rows(lengths, width)]
    else:
        rows = [[Unit((i,))] for i in range(len(sequences))]
    return _lay_out(sequences, lengths, rule, rows)


def _lay_out(
    sequences: Sequence[Sequence[int]], lengths: list[int], rule: ScoringRule, rows: list[list[Unit]]
) -> PackedBatch:
    width = max(sum(unit.width(lengths) for unit in row) for row in rows)
    shape = (len(rows), width)
    input_ids = np.full(shape, rule.pad_id, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    group_ids = np.zeros(shape, dtype=np.int64)
    branch_ids = np.zeros(shape, dtype=np.int64)
    indices = [scored_indices(s, rule) for s in sequences]
    counts = np.array([len(i) for i in indices], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    score_positions = np.empty(int(counts.sum()), dtype=np.int64)
    for r, units in enumerate(rows):
        start = 0
        for group, unit in enumerate(units, start=1):
            p = unit.prefix
            ids = sequences[unit.members[0]]
            input_ids[r, start : start + p] = ids[:p]
            position_ids[r, start : start + p] = np.arange(p)
            group_ids[r, start : start + p] = group
            prefix_start, start = start, start + p
            for branch, i in enumerate(unit.members, start=1 if len(unit.members) > 1 else 0):
                n = lengths[i] - p
                span = slice(start, start + n)
                input_ids[r, span] = sequences[i][p:]
                position_ids[r, span] = np.arange(p, p + n)
                group_ids[r, span] = group
                branch_ids[r, span] = branch
                for k, scored in enumerate(indices[i]):
                    at = start + scored - p if scored >= p else prefix_start + scored
                    score_positions[first[i] + k] = r * width + at
                start += n
    return PackedBatch(input_ids, position_ids, group_ids, branch_ids, score_positions, counts)


def unpad(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[list[int]]:
    """A padded batch (either side) back to its id sequences."""
    return [row[mask.astype(bool)].tolist() for row, mask in zip(input_ids, attention_mask)]
