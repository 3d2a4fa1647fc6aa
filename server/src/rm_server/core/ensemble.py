"""Ensembles: a model defined as a list of member models, each scoring the same inputs in its own batches,
their rewards reduced to one per sample (mean, mean - k std, or min)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rm_contract.bundle import SHA256_PREFIX
from rm_server.core.inputs import ScoreRequest
from rm_server.core.results import EnsembleStats, ModelIdentity, SampleScore
from rm_server.errors import InvalidRequest

if TYPE_CHECKING:
    from rm_server.core.registry import ModelRegistry

ENSEMBLE_FILE = "ensemble.json"


@dataclass(frozen=True)
class EnsembleScores:
    """Per sample: members' normalized rewards (members x samples) and what reduces them."""

    members: np.ndarray
    num_tokens: list[int]
    truncated: list[bool]
    identity: ModelIdentity

    def reduce(self, how: str, k: float) -> np.ndarray:
        if how == "mean_minus_k_std":
            return self.members.mean(axis=0) - k * self.members.std(axis=0)
        if how == "min":
            return self.members.min(axis=0)
        return self.members.mean(axis=0)

    def results(self, how: str, k: float) -> list[SampleScore]:
        """The reduction as each sample's reward, with every member's reward beside it."""
        rewards = self.reduce(how, k)
        mean, std, low = self.members.mean(axis=0), self.members.std(axis=0), self.members.min(axis=0)
        return [
            SampleScore(
                float(rewards[i]),
                self.num_tokens[i],
                self.truncated[i],
                EnsembleStats(float(mean[i]), float(std[i]), float(low[i]), self.members[:, i].tolist()),
            )
            for i in range(len(rewards))
        ]


@dataclass
class Ensemble:
    """A model defined as a list of member models scored on the same inputs, one batch per member."""

    name: str
    members: list[str]
    version: str = "1"
    inflight: int = 0

    async def score(self, registry: ModelRegistry, request: ScoreRequest) -> EnsembleScores:
        """Each member's rewards normalized with its own bundle statistics, so members on different scales
        weigh equally."""
        async with AsyncExitStack() as stack:
            models = [await stack.enter_async_context(registry.use(m, "")) for m in self.members]
            steps = [m.name for m in models if m.bundle.output_kind != "sequence"]
            if steps:  # members must share the output kind; step ensembles are not built yet
                raise InvalidRequest(
                    f"ensemble {self.name}: members {', '.join(steps)} are process reward models; an ensemble "
                    "combines sequence reward models only"
                )
            outcomes = await asyncio.gather(
                *(
                    m.scorer.score(
                        request.samples, normalize=True, strict=request.strict, max_tokens=request.max_tokens
                    )
                    for m in models
                )
            )
        first = outcomes[0].results
        members = ",".join(f"{m.name}:{m.version}:{m.identity.sha256}" for m in models)
        return EnsembleScores(
            np.array([[r.reward for r in o.results] for o in outcomes]),
            [r.num_tokens for r in first],
            [any(o.results[i].truncated for o in outcomes) for i in range(len(first))],
            ModelIdentity(self.name, self.version, hashlib.sha256(members.encode()).hexdigest()[:SHA256_PREFIX]),
        )


def read_ensemble(model_dir: Path) -> Ensemble:
    spec = json.loads((model_dir / ENSEMBLE_FILE).read_text())
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) for m in members):
        raise ValueError(f"{ENSEMBLE_FILE} needs 'members': a list of at least two model names")
    return Ensemble(model_dir.name, members, str(spec.get("version", "1")))
