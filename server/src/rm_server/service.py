"""The gRPC transport: reward.v1 RewardService on grpc.aio, with one error table and per-call metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Coroutine

import grpc
import numpy as np

from rm_client.pb import reward_pb2 as pb
from rm_client.pb import reward_pb2_grpc
from rm_server.convert import samples_from_request, score_response
from rm_server.errors import InvalidRequest, NotReady, RewardServiceError, status_of
from rm_server.metrics import ServiceMetrics
from rm_server.recipe import Sample
from rm_server.scoring import Scorer, preference_probability

log = logging.getLogger("rm_server")


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


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: Scorer, metrics: ServiceMetrics):
        self.scorer = scorer
        self.metrics = metrics
        self.ready = False
        self.inflight = 0
        """Calls being answered, so a graceful shutdown knows when the drain is over."""
        manifest = scorer.bundle.manifest
        self.name, self.version = manifest["name"], str(manifest["version"])

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
            log.info("request %s %s: %s %s", request_id, method, code.name, e)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code, result = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
            log.exception("request %s %s: unexpected error", request_id, method)
        finally:
            self.inflight -= 1
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels("total").observe(time.perf_counter() - started)
        return code, result

    async def _score(self, request: pb.ScoreRequest, request_id: str) -> pb.ScoreResponse:
        strict = request.truncation == pb.TRUNCATION_POLICY_STRICT
        outcome = await self.scorer.score(samples_from_request(request), request.normalize, strict)
        self.metrics.latency.labels("queue").observe(outcome.timing.queue_ms / 1000)
        self.metrics.latency.labels("tokenization").observe(outcome.timing.tokenization_ms / 1000)
        self.metrics.latency.labels("inference").observe(outcome.timing.inference_ms / 1000)
        self.metrics.truncated.inc(sum(r.truncated for r in outcome.results))
        log.debug("request %s: %d samples in %.1f ms", request_id, len(outcome.results), outcome.timing.total_ms)
        return score_response(request_id, outcome, self.name, self.version)

    @rpc
    async def Score(self, request, context, request_id):
        return await self._score(request, request_id)

    async def ScoreStream(self, request_iterator, context):
        """Each request is scored concurrently; responses go out as they finish, tied by request_id."""
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(request: pb.ScoreRequest) -> None:
            request_id = request.request_id or new_request_id()
            code, result = await self.answer("ScoreStream", request_id, self._score(request, request_id))
            if code != grpc.StatusCode.OK:  # the stream goes on; this request's answer carries the error
                result = pb.ScoreResponse(request_id=request_id, error=pb.Error(code=code.value[0], message=result))
            await responses.put(result)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks))
            await responses.put(None)

        reader = asyncio.create_task(read())
        self.inflight += 1
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader
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
        outcome = await self.scorer.score(samples)
        reward_a, reward_b = (r.reward for r in outcome.results)
        return pb.CompareResponse(
            probability_a_preferred=preference_probability(reward_a, reward_b),
            reward_a=reward_a,
            reward_b=reward_b,
            model_name=self.name,
            model_version=self.version,
        )

    @rpc
    async def Rank(self, request, context, request_id):
        if not request.responses:
            raise InvalidRequest("rank needs at least one response")
        for i, response in enumerate(request.responses):
            if not response:
                raise InvalidRequest(f"response {i}: empty response")
        outcome = await self.scorer.score([Sample.from_text(request.prompt, r) for r in request.responses])
        rewards = np.array([r.reward for r in outcome.results])
        order = np.argsort(-rewards, kind="stable")
        return pb.RankResponse(
            order=order.tolist(), rewards=rewards.tolist(), model_name=self.name, model_version=self.version
        )

    @rpc
    async def GetModelInfo(self, request, context, request_id):
        manifest = self.scorer.bundle.manifest
        normalization = manifest.get("normalization") or {}
        return pb.ModelInfo(
            name=self.name,
            version=self.version,
            max_length=manifest["max_length"],
            pooling=manifest["pooling"],
            normalization=pb.NormalizationStats(
                mean=normalization.get("mean", 0.0),
                std=normalization.get("std", 1.0),
                size=normalization.get("size", 0),
                description=normalization.get("description", ""),
            ),
            dtype=self.scorer.variant,
            max_samples_per_request=self.scorer.limits.max_samples_per_request,
            bundle_json=json.dumps(manifest),
        )
