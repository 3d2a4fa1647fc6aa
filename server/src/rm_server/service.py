"""The gRPC transport: reward.v1 RewardService on grpc.aio, with one error table and per-call metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass

import grpc
import numpy as np

from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc
from rm_contract.recipe import Sample
from rm_server.convert import ensemble_response, samples_from_request, score_response
from rm_server.errors import AdminDisabled, InvalidRequest, NotReady, RewardServiceError, status_of
from rm_server.logsafe import RefusalLog, loggable
from rm_server.metrics import ServiceMetrics
from rm_server.models import Ensemble, ModelIdentity, ModelRegistry
from rm_server.scoring import SampleInput, preference_probability

log = logging.getLogger("rm_server")
STREAM_INFLIGHT = 64
"""Requests of one ScoreStream held at once (scored, or answered and waiting to be sent)."""


def rpc(method):
    """A unary handler whose domain errors become the call's gRPC status (see RewardService.answer)."""

    @functools.wraps(method)
    async def wrapper(self: RewardService, request, context: grpc.aio.ServicerContext):
        request_id = getattr(request, "request_id", "") or new_request_id()
        code, result = await self.answer(method.__name__, request_id, method(self, request, context, request_id))
        if code != grpc.StatusCode.OK:
            await context.abort(code, result)
        return result

    return wrapper


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class Rewards:
    rewards: list[float]
    num_tokens: list[int]
    model: ModelIdentity


REDUCTIONS = {
    pb.ENSEMBLE_REDUCE_UNSPECIFIED: "mean",
    pb.ENSEMBLE_REDUCE_MEAN: "mean",
    pb.ENSEMBLE_REDUCE_MEAN_MINUS_K_STD: "mean_minus_k_std",
    pb.ENSEMBLE_REDUCE_MIN: "min",
}


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ServiceMetrics,
        reload: Callable[[], Awaitable[dict[str, list[str]]]] | None = None,
    ):
        self.registry = registry
        self.metrics = metrics
        self.reload = reload
        """Rescans the model repository; None when admin calls are disabled (no token, or no repository)."""
        self.ready = False
        self.refusals = RefusalLog()
        self.inflight = 0
        """Calls being answered, so a graceful shutdown knows when the drain is over."""

    async def answer(self, method: str, request_id: str, work: Coroutine) -> tuple[grpc.StatusCode, object]:
        """Run one request's work: (OK, result), or (status, message) from the one error table; unexpected
        errors become INTERNAL with a logged request id. Counts the call and keeps the in-flight count."""
        started = time.perf_counter()
        code, result = grpc.StatusCode.OK, None
        self.inflight += 1
        try:
            if not self.ready:
                work.close()
                raise NotReady("the model is not ready (loading, warming up or shutting down)")
            result = await work
        except RewardServiceError as e:
            code, result = status_of(e), str(e)
            suppressed = self.refusals.admit(method, code.name)
            if suppressed is not None:
                more = (
                    f" ({suppressed} more {code.name} on {method} not logged since the last line)" if suppressed else ""
                )
                log.info("request %s %s: %s %s%s", loggable(request_id), method, code.name, loggable(str(e), 512), more)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code, result = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
            log.exception("request %s %s: unexpected error", loggable(request_id), method)
        finally:
            self.inflight -= 1
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels("total").observe(time.perf_counter() - started)
        return code, result

    async def _score(self, request: pb.ScoreRequest, request_id: str) -> pb.ScoreResponse:
        strict = request.truncation == pb.TRUNCATION_POLICY_STRICT
        if request.truncation not in pb.TruncationPolicy.values():  # a newer client's value: not silently ignored
            raise InvalidRequest(f"unknown truncation {request.truncation}")
        if request.ensemble_reduce not in REDUCTIONS:
            raise InvalidRequest(f"unknown ensemble_reduce {request.ensemble_reduce}")
        if not (math.isfinite(request.ensemble_k) and request.ensemble_k >= 0):
            raise InvalidRequest(f"ensemble_k must be a finite number >= 0, not {request.ensemble_k}")
        self.registry.settings.limits.check_count(len(request.samples))  # before converting anything
        inputs = samples_from_request(request)
        async with self.registry.use(request.model, request.model_version) as model:
            if isinstance(model, Ensemble):
                started = time.perf_counter()
                scores = await model.score(self.registry, inputs, strict)
                rewards = scores.reduce(REDUCTIONS[request.ensemble_reduce], request.ensemble_k or 1.0)
                elapsed_ms = 1000 * (time.perf_counter() - started)
                return ensemble_response(request_id, scores, rewards, elapsed_ms)
            outcome = await model.scorer.score(inputs, request.normalize, strict)
        self.metrics.latency.labels("queue").observe(outcome.timing.queue_ms / 1000)
        self.metrics.latency.labels("tokenization").observe(outcome.timing.tokenization_ms / 1000)
        self.metrics.latency.labels("inference").observe(outcome.timing.inference_ms / 1000)
        self.metrics.truncated.inc(sum(r.truncated for r in outcome.results))
        log.debug(
            "request %s: %d samples in %.1f ms", loggable(request_id), len(outcome.results), outcome.timing.total_ms
        )
        return score_response(request_id, outcome, model.identity)

    async def rewards_of(
        self,
        samples: list[SampleInput],
        model_name: str = "",
        version: str = "",
        strict: bool = False,
        max_tokens: int | None = None,
    ) -> Rewards:
        """Rewards (an ensemble's mean for ensembles), with token counts and the model that gave them."""
        async with self.registry.use(model_name, version) as model:
            if isinstance(model, Ensemble):
                scores = await model.score(self.registry, samples, strict, max_tokens)
                return Rewards(scores.mean.tolist(), scores.num_tokens, scores.identity)
            results = (await model.scorer.score(samples, strict=strict, max_tokens=max_tokens)).results
            return Rewards([r.reward for r in results], [r.num_tokens for r in results], model.identity)

    @rpc
    async def Score(self, request, context, request_id):
        return await self._score(request, request_id)

    async def ScoreStream(self, request_iterator, context):
        """Each request is scored concurrently; responses go out as they finish, tied by request_id.

        At most STREAM_INFLIGHT requests of one stream are held at once (being scored or answered and not yet
        sent): beyond that the server stops reading, and gRPC's flow control holds the client back, so a
        client that writes fast and never reads costs bounded memory. A message that does not parse ends the
        stream at once with INVALID_ARGUMENT."""
        responses: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_INFLIGHT)
        tasks: set[asyncio.Task] = set()
        broken: list[str] = []

        async def one(request: pb.ScoreRequest) -> None:
            request_id = request.request_id or new_request_id()
            code, result = await self.answer("ScoreStream", request_id, self._score(request, request_id))
            if code != grpc.StatusCode.OK:  # the stream goes on; this request's answer carries the error
                result = pb.ScoreResponse(request_id=request_id, error=pb.Error(code=code.value[0], message=result))
            await responses.put(result)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()  # released when its response has been sent
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            except Exception as e:  # noqa: BLE001 - a message that does not parse: end the stream, say why
                broken.append(f"a message on the stream is not a valid ScoreRequest ({type(e).__name__})")
            finally:  # whatever ends the reader, the writer learns that nothing more comes
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        self.inflight += 1
        try:
            while (response := await responses.get()) is not None:
                yield response
                slots.release()
            await reader
            if broken:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, broken[0])
        finally:  # done, or the caller went away: drop its queued work
            self.inflight -= 1
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @rpc
    async def Compare(self, request, context, request_id):
        if not request.response_a or not request.response_b:
            raise InvalidRequest("both response_a and response_b must be non-empty")
        samples = [
            Sample.from_text(request.prompt, request.response_a),
            Sample.from_text(request.prompt, request.response_b),
        ]
        scored = await self.rewards_of(samples, request.model, request.model_version)
        reward_a, reward_b = scored.rewards
        return pb.CompareResponse(
            probability_a_preferred=preference_probability(reward_a, reward_b),
            reward_a=reward_a,
            reward_b=reward_b,
            model_name=scored.model.name,
            model_version=scored.model.version,
            model_sha256=scored.model.sha256,
        )

    @rpc
    async def Rank(self, request, context, request_id):
        if not request.responses:
            raise InvalidRequest("rank needs at least one response")
        for i, response in enumerate(request.responses):
            if not response:
                raise InvalidRequest(f"response {i}: empty response")
        samples = [Sample.from_text(request.prompt, r) for r in request.responses]
        scored = await self.rewards_of(samples, request.model, request.model_version)
        rewards = np.array(scored.rewards)
        order = np.argsort(-rewards, kind="stable")
        return pb.RankResponse(
            order=order.tolist(),
            rewards=rewards.tolist(),
            model_name=scored.model.name,
            model_version=scored.model.version,
            model_sha256=scored.model.sha256,
        )

    @rpc
    async def GetModelInfo(self, request, context, request_id):
        model = self.registry.resolve(request.model, request.model_version)
        loaded = [
            pb.LoadedModel(
                name=name,
                version=version,
                is_default_version=serving,
                is_default_model=name == self.registry.default_model,
                members=members,
                model_sha256=sha256,
            )
            for name, version, serving, members, sha256 in self.registry.loaded()
        ]
        if isinstance(model, Ensemble):
            return pb.ModelInfo(name=model.name, version=model.version, pooling="ensemble", loaded=loaded)
        manifest = model.bundle.manifest
        normalization = manifest.get("normalization") or {}
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            max_length=manifest["max_length"],
            pooling=manifest["pooling"],
            normalization=pb.NormalizationStats(
                mean=normalization.get("mean", 0.0),
                std=normalization.get("std", 1.0),
                size=normalization.get("size", 0),
                description=normalization.get("description", ""),
            ),
            dtype=model.settings.variant,
            max_samples_per_request=model.settings.limits.max_samples_per_request,
            bundle_json=json.dumps(manifest),
            loaded=loaded,
            model_sha256=model.identity.sha256,
        )

    @rpc
    async def ReloadModels(self, request, context, request_id):
        if self.reload is None:
            raise AdminDisabled(
                "ReloadModels needs a model repository (--model-repo) and a bearer token (--auth-token-file)"
            )
        report = await self.reload()
        return pb.ReloadModelsResponse(**report)
