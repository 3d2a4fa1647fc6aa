"""How id sequences become one batch, the same in training, export checks and serving.

Rows are padded to the longest one, on either side; the attention mask marks the real ids. Position ids
follow the mask (they count real ids only), so a row gets the same positions, and the same reward, however
much padding a batch adds and on whichever side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

Mask = TypeVar("Mask")


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> tuple[np.ndarray, np.ndarray]:
    """Pad id sequences to the longest: (input_ids, attention_mask), both (B, T) int64."""
    T = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), T), dtype=np.int64)
    for row, seq in enumerate(sequences):
        span = slice(T - len(seq), T) if padding_side == "left" else slice(0, len(seq))
        input_ids[row, span] = seq
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: Mask) -> Mask:
    """(B, T) mask -> (B, T) positions counting real ids only (0 on left padding). Works on numpy arrays
    and torch tensors alike, so this module needs no torch."""
    return (attention_mask.cumsum(-1) - 1).clip(min=0)
