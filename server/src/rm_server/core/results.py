"""What the inference core answers, in domain terms: every transport converts these to its wire."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelIdentity:
    """Which model scored an answer: name, version and `served_sha256` (the bundle's files, recipe and the
    variant served); an ensemble's is a digest of its members'."""

    name: str
    version: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EnsembleStats:
    """One sample's member rewards (each normalized with its own bundle's statistics) and their reductions."""

    mean: float
    std: float
    min: float
    members: list[float]


@dataclass(frozen=True)
class SampleScore:
    reward: float
    num_tokens: int
    truncated: bool
    ensemble: EnsembleStats | None = None
    step_rewards: tuple[float, ...] | None = None
    """A process reward model's P(step correct) per step, in order; `reward` is their reduction."""
    step_positions: tuple[int, ...] | None = None
    """Each step token's index among the scored ids."""


@dataclass(frozen=True)
class Timing:
    queue_ms: float = 0.0
    tokenization_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class ScoreOutcome:
    """One model version's scores of a request's samples."""

    results: list[SampleScore]
    timing: Timing
    normalized: bool


@dataclass(frozen=True)
class ScoreResult:
    """A request's answer: one score per sample in order, the model that gave them, the time it took."""

    results: list[SampleScore]
    model: ModelIdentity
    timing: Timing
    normalized: bool

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.results]

    @property
    def num_tokens(self) -> list[int]:
        return [r.num_tokens for r in self.results]


@dataclass(frozen=True)
class Comparison:
    probability_a_preferred: float
    reward_a: float
    reward_b: float
    model: ModelIdentity


@dataclass(frozen=True)
class Ranking:
    order: list[int]
    """Response indices, best first (ties keep their input order)."""
    rewards: list[float]
    model: ModelIdentity


@dataclass(frozen=True)
class HeldModel:
    """A model version the server holds: whether requests without a version get it, and an ensemble's
    members."""

    name: str
    version: str
    serving: bool
    is_default_model: bool
    members: list[str]
    sha256: str
    max_length: int | None
    """None for an ensemble."""
    aliases: tuple[str, ...] = ()
    """Other names requests may give it (--served-model-name)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    pooling: str
    held: list[HeldModel]
    max_length: int = 0
    normalization: dict | None = None
    variant: str = ""
    max_samples_per_request: int = 0
    manifest: dict | None = None
    """A bundle version's bundle.json; None for an ensemble."""
