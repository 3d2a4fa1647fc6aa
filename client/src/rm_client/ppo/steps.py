"""Dense rewards from a process reward model: a generated response cut into steps at the reward model's step
token, and each step's score placed on the policy token where that step ends.

A response's text is split at every occurrence of the step token's text (`ModelInfo.step_token`: "\\n" for
TRL's PRMs); pieces that are empty or whitespace are no steps (a blank line). A step ends at its step token,
or, for the last one when the response does not end with one, at the response's last character; its reward
goes on the policy token that holds that character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepSplit:
    steps: list[str]
    """The steps sent to the reward service ([""] for a response with none: scored as one empty step)."""
    end_chars: list[int]
    """Per step, the character of the response where it ends (its step token, or the last character)."""


def split_steps(text: str, step_token: str) -> StepSplit:
    steps, ends, start = [], [], 0
    while start <= len(text):
        found = text.find(step_token, start)
        end = found if found >= 0 else len(text) - 1
        piece = text[start : found if found >= 0 else len(text)]
        if piece.strip():
            steps.append(piece)
            ends.append(end)
        if found < 0:
            break
        start = found + len(step_token)
    if not steps:
        return StepSplit([""], [max(len(text) - 1, 0)])
    return StepSplit(steps, ends)


def step_end_tokens(tokenizer, response_ids: Sequence[int], end_chars: Sequence[int]) -> list[int]:
    """The index of the response token holding each end character: the first token whose decoded prefix
    reaches past it (decoding the prefix, not each token, keeps multi-byte characters whole)."""
    ends, k = [], 0
    for t in range(len(response_ids)):
        covered = len(tokenizer.decode(response_ids[: t + 1], skip_special_tokens=True))
        while k < len(end_chars) and covered > end_chars[k]:
            ends.append(t)
            k += 1
        if k == len(end_chars):
            break
    last = max(len(response_ids) - 1, 0)
    return ends + [last] * (len(end_chars) - len(ends))  # an empty response: its one step on token 0


def dense_step_rewards(
    step_scores: Sequence[Sequence[float]], step_ends: Sequence[Sequence[int]], shape: tuple[int, int], weight: float
) -> torch.Tensor:
    """(B, R) rewards: `weight` x each step's score on the token where the step ends (two steps ending on
    one token add up), zero elsewhere."""
    rewards = torch.zeros(shape)
    for row, (scores, ends) in enumerate(zip(step_scores, step_ends)):
        for score, end in zip(scores, ends):
            rewards[row, end] += weight * score
    return rewards
