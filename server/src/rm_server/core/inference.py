"""The one inference entry every transport calls: resolve the model, score a bundle version or an ensemble,
answer in domain results or raise domain errors, and record the same metrics whatever the wire.

A transport converts its wire message into a `ScoreRequest` (or the arguments of `compare`, `rank`,
`model_info`), calls it inside `call()`, and converts the answer or the `RewardServiceError` back with its
own status table. `call()` counts every request by method and status, keeps the in-flight count that the
graceful drain waits on, refuses work while the server is not ready, and turns anything unexpected into an
`InternalError` naming the logged request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TypeVar

import numpy as np

from rm_contract.recipe import Sample
from rm_server.core.ensemble import Ensemble
from rm_server.core.inputs import Limits, ScoreRequest
from rm_server.core.logsafe import RefusalLog, loggable
from rm_server.core.metrics import ServiceMetrics
from rm_server.core.registry import ModelRegistry
from rm_server.core.results import Comparison, HeldModel, ModelInfo, Ranking, ScoreResult, Timing
from rm_server.core.scoring import preference_probability
from rm_server.errors import AdminDisabled, InternalError, InvalidRequest, NotReady, RewardServiceError

log = logging.getLogger("rm_server")
T = TypeVar("T")
Reload = Callable[[], Awaitable[dict[str, list[str]]]]


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class Inference:
    def __init__(self, registry: ModelRegistry, metrics: ServiceMetrics, reload: Reload | None = None):
        self.registry = registry
        self.metrics = metrics
        self._reload = reload
        """Rescans the model repository; None when admin calls are disabled (no token, or no repository)."""
        self.ready = False
        self.inflight = 0
        """Calls being answered, so a graceful shutdown knows when the drain is over."""
        self._refusals = RefusalLog()

    @property
    def limits(self) -> Limits:
        return self.registry.settings.limits

    async def call(self, method: str, request_id: str, work: Coroutine[None, None, T]) -> T:
        """Run one request's work: its result, or a RewardServiceError (anything unexpected becomes an
        InternalError with the request id logged beside the traceback). Counted by method and status."""
        started = time.perf_counter()
        status = "OK"
        self.inflight += 1
        try:
            if not self.ready:
                work.close()
                raise NotReady("the model is not ready (loading, warming up or shutting down)")
            return await work
        except RewardServiceError as e:
            status = e.status
            self._log_refusal(method, request_id, e)
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("request %s %s: unexpected error", loggable(request_id), method)
            raise InternalError(f"internal error (request id {request_id})") from None
        finally:
            self.inflight -= 1
            self.metrics.requests.labels(method, status).inc()
            self.metrics.latency.labels("total").observe(time.perf_counter() - started)

    def _log_refusal(self, method: str, request_id: str, error: RewardServiceError) -> None:
        suppressed = self._refusals.admit(method, error.status)
        if suppressed is None:
            return
        more = f" ({suppressed} more {error.status} on {method} not logged since the last line)" if suppressed else ""
        log.info("request %s %s: %s %s%s", loggable(request_id), method, error.status, loggable(str(error), 512), more)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Rewards of the request's samples in order, from a bundle version or an ensemble (reduced as asked,
        members' rewards beside)."""
        self.limits.check_count(len(request.samples))
        async with self.registry.use(request.model, request.version) as model:
            if isinstance(model, Ensemble):
                started = time.perf_counter()
                scores = await model.score(self.registry, request)
                timing = Timing(total_ms=1000 * (time.perf_counter() - started))
                results = scores.results(request.ensemble_reduce, request.ensemble_k)
                return ScoreResult(results, scores.identity, timing, normalized=True)
            outcome = await model.scorer.score(
                request.samples, request.normalize, request.strict, request.max_tokens, request.step_reduce
            )
        self.metrics.record_outcome(outcome)
        return ScoreResult(outcome.results, model.identity, outcome.timing, outcome.normalized)

    async def compare(
        self, prompt: str, response_a: str, response_b: str, model: str = "", version: str = ""
    ) -> Comparison:
        """P(A preferred to B) under Bradley-Terry, with both rewards (an ensemble's mean)."""
        if not response_a or not response_b:
            raise InvalidRequest("both response_a and response_b must be non-empty")
        if self.output_kind(model)[0] == "steps":
            raise InvalidRequest(
                "Compare gives the Bradley-Terry probability of two rewards; a process reward model gives "
                "probabilities of correct steps: use Score (step_rewards) or Rank"
            )
        samples = [Sample.from_text(prompt, response_a), Sample.from_text(prompt, response_b)]
        scored = await self.score(ScoreRequest(samples, model, version))
        reward_a, reward_b = scored.rewards
        return Comparison(preference_probability(reward_a, reward_b), reward_a, reward_b, scored.model)

    async def rank(self, prompt: str, responses: list[str], model: str = "", version: str = "") -> Ranking:
        """Responses ordered by reward, best first; ties keep their order."""
        if not responses:
            raise InvalidRequest("rank needs at least one response")
        for i, response in enumerate(responses):
            if not response:
                raise InvalidRequest(f"response {i}: empty response")
        scored = await self.score(ScoreRequest([Sample.from_text(prompt, r) for r in responses], model, version))
        rewards = np.array(scored.rewards)
        return Ranking(np.argsort(-rewards, kind="stable").tolist(), rewards.tolist(), scored.model)

    def model_info(self, model_name: str = "", version: str = "") -> ModelInfo:
        model = self.registry.resolve(model_name, version)
        held = self.registry.held()
        if isinstance(model, Ensemble):
            return ModelInfo(model.name, model.version, "", "ensemble", held)
        manifest = model.bundle.manifest
        return ModelInfo(
            name=model.name,
            version=model.version,
            sha256=model.identity.sha256,
            pooling=manifest["pooling"],
            held=held,
            max_length=manifest["max_length"],
            normalization=manifest.get("normalization") or {},
            variant=model.settings.variant,
            max_samples_per_request=model.settings.limits.max_samples_per_request,
            manifest=manifest,
        )

    def output_kind(self, model_name: str = "") -> tuple[str, int]:
        """What a model answers per sample, before any work: ("sequence", 1), or ("steps", classes) for a
        process reward model (2: TRL's two-class softmax, 1: a sigmoid)."""
        model = self.registry.resolve(model_name, "")
        if isinstance(model, Ensemble):
            return "sequence", 1
        return model.bundle.output_kind, int(model.bundle.manifest.get("step_classes", 1))

    def served_models(self) -> list[HeldModel]:
        """The models requests without a version get: each model's serving version, and the ensembles."""
        return [m for m in self.registry.held() if m.serving]

    async def reload(self) -> dict[str, list[str]]:
        """Admin: rescan the model repository now."""
        if self._reload is None:
            raise AdminDisabled(
                "ReloadModels needs a model repository (--model-repo) and a bearer token (--auth-token-file)"
            )
        return await self._reload()
