"""What a request asks, in domain terms: the three kinds of sample input, the request itself, and the limits
every transport checks on the wire message before converting anything."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rm_contract.recipe import Message, RecipeError, Sample, TextInput
from rm_server.errors import InvalidRequest

MAX_MESSAGES_PER_CONVERSATION = 1024
"""Turns in one conversation sample: far beyond any chat a reward model scores, far below what stalls the
chat template (2 million empty messages took 25-52 s to render and score)."""
ENSEMBLE_REDUCTIONS = ("mean", "mean_minus_k_std", "min")
STEP_REDUCTIONS = ("min", "last", "product", "mean")
"""How a process reward model's step scores become one reward (rm_server.core.scoring.reduce_steps)."""


@dataclass(frozen=True)
class TokenInput:
    """Pre-tokenized ids, scored as they are."""

    ids: tuple[int, ...]


SampleInput = Sample | TokenInput | TextInput


@dataclass(frozen=True)
class ScoreRequest:
    """Samples to score with one model (a bundle version or an ensemble), and how."""

    samples: list[SampleInput]
    model: str = ""
    """A loaded model's name; empty: the default model."""
    version: str = ""
    """A loaded version; empty: the version the model serves."""
    normalize: bool = False
    """Rewards normalized with the bundle's statistics (an ensemble's members always are)."""
    strict: bool = False
    """Refuse an over-long sample instead of truncating it."""
    max_tokens: int | None = None
    """Keep at most this many ids, the last (vLLM's truncate_prompt_tokens)."""
    ensemble_reduce: str = "mean"
    """How an ensemble's member rewards become one reward: mean, mean_minus_k_std or min."""
    ensemble_k: float = 1.0
    step_reduce: str = "min"
    """Process reward models: how the step scores become the sample's reward (STEP_REDUCTIONS)."""

    def __post_init__(self) -> None:
        check_ensemble_options(self.ensemble_reduce, self.ensemble_k)
        if self.step_reduce not in STEP_REDUCTIONS:
            raise InvalidRequest(
                f"unknown step reduction {self.step_reduce!r}; expected one of {', '.join(STEP_REDUCTIONS)}"
            )


def check_ensemble_options(reduce: str, k: float) -> None:
    if reduce not in ENSEMBLE_REDUCTIONS:
        raise InvalidRequest(f"unknown ensemble reduction {reduce!r}")
    if not (math.isfinite(k) and k >= 0):
        raise InvalidRequest(f"ensemble_k must be a finite number >= 0, not {k}")


@dataclass(frozen=True)
class Limits:
    max_samples_per_request: int
    """From --max-samples-per-request, at most --max-queue."""
    max_admitted: int = 8192
    """Samples held at once (being tokenized, waiting or being scored): from --max-queue."""
    max_chars_per_sample: int = 1_000_000
    """Text longer than this is refused before tokenization (tokenizing it would stall a worker)."""

    def check_count(self, samples: int) -> None:
        """Refuse a request by its sample count alone: transports call this on the wire message, before
        converting anything (a million tiny samples froze the event loop for seconds)."""
        if not samples:
            raise InvalidRequest("request has no samples")
        if samples > self.max_samples_per_request:
            raise InvalidRequest(
                f"request has {samples} samples; at most {self.max_samples_per_request} are accepted per request"
            )


def conversation(messages: Sequence[Message]) -> Sample:
    """A conversation as one sample (the recipe's split rule), its size checked first: the one validation of
    conversations for every transport. Transports check the count on the wire message before building
    `messages` (`check_conversation_length`)."""
    check_conversation_length(len(messages))
    try:
        return Sample.from_messages(messages)
    except RecipeError as e:
        raise InvalidRequest(str(e)) from None


MAX_STEPS_PER_SAMPLE = 65536
"""Steps in one solution: each takes at least its step token, so more never fit a model; counted on the wire
message before its steps are converted (millions of empty steps would hold the event loop)."""


def check_step_count(steps: int) -> None:
    if steps > MAX_STEPS_PER_SAMPLE:
        raise InvalidRequest(f"{steps} steps; at most {MAX_STEPS_PER_SAMPLE} per solution")


def check_conversation_length(messages: int) -> None:
    if messages > MAX_MESSAGES_PER_CONVERSATION:
        raise InvalidRequest(f"{messages} messages; at most {MAX_MESSAGES_PER_CONVERSATION} per conversation")


def characters(sample: SampleInput) -> int:
    """The text a sample holds (0 for token ids): what the per-sample size limit counts."""
    if isinstance(sample, TextInput):
        return len(sample.text)
    if isinstance(sample, Sample):
        steps = sum(len(step) + 1 for step in sample.steps or ())  # + its step token, so empty steps count
        return sum(len(m.content) for m in sample.prompt + sample.response) + steps
    return 0
