"""Reward-service clients: `AsyncRewardClient` (asyncio) and `RewardClient` (blocking, same methods).

    with RewardClient("localhost:50051") as client:
        rewards = client.score(["How are you?"], ["Great, thanks for asking!"])   # numpy float32, input order

Large inputs are split into chunks that respect the server's per-request limit and sent concurrently;
calls are retried with backoff on UNAVAILABLE / RESOURCE_EXHAUSTED (a replica that dies mid-call is
retried on another), bounded by a per-call deadline. Every failure raises `RewardServiceError`: a score is
either the server's answer or an exception, never a placeholder.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_client.channel import Replicas, Security
from rm_client.errors import RewardServiceError
from rm_client.retry import RetryBudget, RetryPolicy, call_with_retries, retry_pause
from rm_client.samples import (
    Conversation,
    conversation_samples,
    prompt_completion_samples,
    text_samples,
    token_samples,
)
from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc

T = TypeVar("T")
log = logging.getLogger(__name__)
USE_CLIENT_TIMEOUT: Any = object()
"""`stream_scores`' default deadline: the client's `timeout_s`."""
TRUNCATION = {"truncate": pb.TRUNCATION_POLICY_TRUNCATE, "strict": pb.TRUNCATION_POLICY_STRICT}
ENSEMBLE_REDUCE = {
    "mean": pb.ENSEMBLE_REDUCE_MEAN,
    "mean_minus_k_std": pb.ENSEMBLE_REDUCE_MEAN_MINUS_K_STD,
    "min": pb.ENSEMBLE_REDUCE_MIN,
}
STEP_REDUCE = {
    "min": pb.STEP_REDUCE_MIN,
    "last": pb.STEP_REDUCE_LAST,
    "product": pb.STEP_REDUCE_PRODUCT,
    "mean": pb.STEP_REDUCE_MEAN,
}


@dataclass(frozen=True)
class Comparison:
    probability_a_preferred: float
    reward_a: float
    reward_b: float


@dataclass(frozen=True)
class StepScores:
    """A process reward model's answer: each solution's reward (its steps reduced) and its step scores."""

    rewards: np.ndarray
    steps: list[np.ndarray]
    """P(step correct) per step of each solution, in order."""


@dataclass(frozen=True)
class Ranking:
    order: list[int]
    """Indices of the responses from best to worst."""
    rewards: np.ndarray


def model_identity(response: pb.ScoreResponse) -> str:
    """`name vVERSION sha256:PREFIX`: which model scored an answer (the server sets all three)."""
    return f"{response.model_name} v{response.model_version} sha256:{response.model_sha256}"


class AsyncRewardClient:
    """asyncio client; open it with `async with` or call `close()`."""

    last_models: tuple[str, ...] = ()
    """The models (`model_identity`) that answered the latest `score*` call: one, or several when a new
    version took over during the call; a trainer logs it with each step's rewards."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout_s: float | None = 60.0,
        retry: RetryPolicy | None = None,
        security: Security | None = None,
        chunk_size: int | None = None,
        max_in_flight: int = 8,
        max_message_mb: int = 64,
        keepalive_s: float = 30.0,
        model: str = "",
        model_version: str = "",
        ensemble_reduce: str = "mean",
        ensemble_k: float = 1.0,
    ):
        """`target`: `host:port`, a list of them (one per replica), or a gRPC URI such as `dns:///name:port`.
        `timeout_s`: deadline of each method call, retries included. `chunk_size`: samples per request
        (default: the server's max_samples_per_request, at most 512). `max_in_flight`: chunks sent at once.
        `model`, `model_version`: which of the server's models answers (default: its default model and
        serving version). `ensemble_reduce` (mean, mean_minus_k_std, min) and `ensemble_k`: the reward an
        ensemble model returns."""
        if ensemble_reduce not in ENSEMBLE_REDUCE:
            raise ValueError(f"ensemble_reduce must be one of {sorted(ENSEMBLE_REDUCE)}, not {ensemble_reduce!r}")
        self.model, self.model_version = model, model_version
        self._reduce, self.ensemble_k = ENSEMBLE_REDUCE[ensemble_reduce], ensemble_k
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        security = security or Security()
        self._replicas = Replicas(target, security, max_message_mb, keepalive_s)
        self._stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in self._replicas.channels]
        self._health_stubs = [health_pb2_grpc.HealthStub(c) for c in self._replicas.channels]
        self._metadata = security.metadata()
        self.timeout_s, self.retry, self.max_in_flight = timeout_s, retry or RetryPolicy(), max_in_flight
        self._retry_budget = RetryBudget(self.retry)  # shared by every call of this client
        self._chunk_size = chunk_size

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._replicas.close()

    def _stub(self) -> reward_pb2_grpc.RewardServiceStub:
        """The next replica's stub: calls, and each retry of a call, go to the replicas in turn."""
        return self._stubs[self._replicas.pick()]

    async def _unary(self, method: str, request, timeout_s: float | None = None):
        """One RPC (`method` of RewardService) with retries and the overall deadline."""

        async def attempt(remaining: float | None):
            call = getattr(self._stub(), method)
            return await call(request, timeout=remaining, metadata=self._metadata, wait_for_ready=False)

        timeout_s = timeout_s if timeout_s is not None else self.timeout_s
        return await call_with_retries(attempt, self.retry, timeout_s, self._retry_budget)

    # --- scoring -----------------------------------------------------------------------------------------

    def _score_request(
        self, samples: Sequence[pb.Sample], normalize: bool, truncation: str, request_id: str = "", step_reduce=0
    ) -> pb.ScoreRequest:
        """The reward.v1 ScoreRequest of every scoring call, unary or streamed: the samples with this client's
        model, version and ensemble reduction."""
        return pb.ScoreRequest(
            step_reduce=step_reduce,
            request_id=request_id,
            samples=samples,
            normalize=normalize,
            truncation=TRUNCATION[truncation],
            model=self.model,
            model_version=self.model_version,
            ensemble_reduce=self._reduce,
            ensemble_k=self.ensemble_k,
        )

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, normalize: bool = False, truncation: str = "truncate"
    ) -> np.ndarray:
        """Rewards of (prompt, response) pairs, in input order."""
        return await self.score_samples(text_samples(prompts, responses), normalize=normalize, truncation=truncation)

    async def score_conversations(
        self, conversations: Sequence[Conversation], *, normalize: bool = False, truncation: str = "truncate"
    ) -> np.ndarray:
        """Rewards of chat conversations, each ending with the assistant message(s) to score."""
        samples = conversation_samples(conversations)
        return await self.score_samples(samples, normalize=normalize, truncation=truncation)

    async def score_tokens(
        self, sequences: Sequence[Sequence[int]], *, normalize: bool = False, truncation: str = "truncate"
    ) -> np.ndarray:
        """Rewards of already-tokenized inputs (the model's own input format, special tokens included)."""
        return await self.score_samples(token_samples(sequences), normalize=normalize, truncation=truncation)

    async def score_completions(
        self, prompts: Sequence, completions: Sequence, *, normalize: bool = False
    ) -> np.ndarray:
        """TRL's shapes: strings, or prompt messages with generated assistant messages."""
        return await self.score_samples(prompt_completion_samples(prompts, completions), normalize=normalize)

    async def score_steps(
        self, prompts: Sequence[str], solutions: Sequence[Sequence[str]], *, reduce: str = "min"
    ) -> StepScores:
        """A process reward model's scores of solutions given as their steps (the server ends each step with
        the bundle's step token): P(step correct) per step, and each solution's `reduce` of them (min, last,
        product or mean) as its reward."""
        if len(prompts) != len(solutions):
            raise ValueError(f"{len(prompts)} prompts but {len(solutions)} solutions")
        if reduce not in STEP_REDUCE:
            raise ValueError(f"reduce must be one of {', '.join(STEP_REDUCE)}, not {reduce!r}")
        samples = [pb.Sample(steps=pb.Steps(prompt=p, steps=list(s))) for p, s in zip(prompts, solutions)]
        results = await self.score_results(samples, step_reduce=STEP_REDUCE[reduce])
        return StepScores(
            np.array([r.reward for r in results], dtype=np.float32),
            [np.array(r.step_rewards, dtype=np.float32) for r in results],
        )

    async def score_samples(
        self, samples: Sequence[pb.Sample], *, normalize: bool = False, truncation: str = "truncate"
    ) -> np.ndarray:
        """Rewards of reward.v1 Samples, split into concurrent chunks and reassembled in order."""
        results = await self.score_results(samples, normalize=normalize, truncation=truncation)
        return np.array([r.reward for r in results], dtype=np.float32)

    async def score_results(
        self, samples: Sequence[pb.Sample], *, normalize: bool = False, truncation: str = "truncate", step_reduce=0
    ) -> list[pb.SampleResult]:
        """Each sample's whole SampleResult (step rewards, ensemble statistics), in input order: the samples
        split into concurrent chunks and reassembled.

        One deadline (`timeout_s`) covers the whole call: the model-info lookup, every chunk, its wait for a
        slot among `max_in_flight` and its retries. The first chunk that fails cancels the others."""
        _check_truncation(truncation)
        if not samples:
            return []
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        gate, failed = asyncio.Semaphore(self.max_in_flight), asyncio.Event()
        models: set[str] = set()

        async def one(chunk: Sequence[pb.Sample]) -> list[pb.SampleResult]:
            request = self._score_request(chunk, normalize, truncation, step_reduce=step_reduce)
            async with gate:
                if failed.is_set():  # a sibling failed while this one waited for a slot: the call is over
                    return []
                try:
                    response = await self._unary("Score", request, _left(deadline))
                except BaseException:
                    failed.set()  # before the slot is released to the next chunk
                    raise
            if len(response.results) != len(chunk):
                raise RewardServiceError(
                    grpc.StatusCode.INTERNAL, f"server answered {len(response.results)} results for {len(chunk)}"
                )
            models.add(model_identity(response))
            return list(response.results)

        tasks: list[asyncio.Task] = []
        try:
            async with asyncio.timeout(_left(deadline)):  # also bounds the waits for a slot
                size = await self.chunk_size(_left(deadline))
                tasks = [asyncio.ensure_future(one(samples[i : i + size])) for i in range(0, len(samples), size)]
                parts = await asyncio.gather(*tasks)
        except (TimeoutError, RewardServiceError) as error:
            if isinstance(error, RewardServiceError) and error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            done = sum(t.done() and not t.cancelled() and t.exception() is None for t in tasks)
            raise RewardServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline of {self.timeout_s} s passed with {done} of {len(tasks)} chunks answered",
            ) from None
        finally:  # a failed chunk (or the deadline) leaves no sibling running or retrying after we return
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.last_models = tuple(sorted(models))
        return [r for part in parts for r in part]

    async def chunk_size(self, timeout_s: float | None = None) -> int:
        if self._chunk_size is None:
            request = pb.GetModelInfoRequest(model=self.model, model_version=self.model_version)
            info = await self._unary("GetModelInfo", request, timeout_s)
            self._chunk_size = min(512, info.max_samples_per_request or 512)
        return self._chunk_size

    async def compare(self, prompt: str, response_a: str, response_b: str) -> Comparison:
        """Bradley-Terry probability that A is preferred to B, with both rewards."""
        request = pb.CompareRequest(
            prompt=prompt,
            response_a=response_a,
            response_b=response_b,
            model=self.model,
            model_version=self.model_version,
        )
        r = await self._unary("Compare", request)
        return Comparison(r.probability_a_preferred, r.reward_a, r.reward_b)

    async def rank(self, prompt: str, responses: Sequence[str]) -> Ranking:
        """Responses ordered from best to worst by reward."""
        request = pb.RankRequest(
            prompt=prompt, responses=list(responses), model=self.model, model_version=self.model_version
        )
        r = await self._unary("Rank", request)
        return Ranking(list(r.order), np.array(r.rewards, dtype=np.float32))

    async def model_info(self) -> pb.ModelInfo:
        request = pb.GetModelInfoRequest(model=self.model, model_version=self.model_version)
        return await self._unary("GetModelInfo", request)

    async def reload_models(self) -> pb.ReloadModelsResponse:
        """Admin: make the server rescan its model repository now (needs the server's token)."""
        return await self._unary("ReloadModels", pb.ReloadModelsRequest())

    async def health(self, service: str = "") -> str:
        """grpc.health.v1 status name: SERVING, NOT_SERVING, ... (no retries: it reports the present)."""
        try:
            answer = await self._health_stubs[self._replicas.pick()].Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise RewardServiceError.from_rpc_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    async def stream_scores(
        self,
        requests: Iterable[Sequence[pb.Sample]] | AsyncIterable[Sequence[pb.Sample]],
        *,
        in_flight: int = 8,
        normalize: bool = False,
        truncation: str = "truncate",
        timeout_s: float | None = USE_CLIENT_TIMEOUT,
    ) -> AsyncIterator[tuple[int, np.ndarray]]:
        """Score many requests over one ScoreStream, keeping `in_flight` of them outstanding; yields
        `(index, rewards)` as each finishes (not necessarily in order). A failed request raises.
        `normalize` and `truncation` apply to every request, as in `score_samples`.

        `timeout_s` (default: the client's) bounds the whole stream; None for a stream without end. A stream
        broken with a retryable status (a replica restarting) is opened again, up to the retry policy's
        attempts, and the requests it left unanswered are sent again (scoring is idempotent). `requests` may be
        an async iterable; a plain iterable is read in a worker thread, so a slow generator (rollouts being
        produced) never blocks the event loop."""
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        _check_truncation(truncation)
        timeout_s = self.timeout_s if timeout_s is USE_CLIENT_TIMEOUT else timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        source = _StreamSource(requests)
        self._retry_budget.record_call()
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                async for answer in self._stream_once(source, in_flight, normalize, truncation, _left(deadline)):
                    yield answer
                return
            except RewardServiceError as error:  # reopened with what it left unanswered, as a unary call retries
                pause = retry_pause(error.code, error.message, attempt, self.retry, deadline, self._retry_budget)
            await asyncio.sleep(pause)

    async def _stream_once(
        self, source: _StreamSource, in_flight: int, normalize: bool, truncation: str, timeout_s: float | None
    ) -> AsyncIterator[tuple[int, np.ndarray]]:
        """One ScoreStream call: first the requests a broken stream left unanswered, then new ones."""
        if timeout_s is not None and timeout_s <= 0:
            raise RewardServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the stream's deadline passed")
        window = asyncio.Semaphore(in_flight)
        sent: set[int] = set()

        async def outgoing() -> AsyncIterator[pb.ScoreRequest]:
            async for index, samples in source.resend_then_next():
                await window.acquire()
                sent.add(index)
                yield self._score_request(samples, normalize, truncation, request_id=str(index))

        call = self._stub().ScoreStream(outgoing(), timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                window.release()
                index = int(response.request_id) if response.request_id.isdigit() else -1
                if response.HasField("error"):
                    code = _status_code(response.error.code)
                    raise RewardServiceError(code, f"request {response.request_id}: {response.error.message}")
                samples = source.unanswered.get(index)
                if index not in sent or samples is None or len(response.results) != len(samples):
                    raise RewardServiceError(grpc.StatusCode.INTERNAL, f"unexpected response {response.request_id!r}")
                del source.unanswered[index]
                yield index, np.array([r.reward for r in response.results], dtype=np.float32)
            code = await call.code()  # a stream the server ended with a status may end the loop quietly
            if code != grpc.StatusCode.OK:
                raise RewardServiceError(code, await call.details() or "")
        except grpc.RpcError as error:
            # The status the call ended with wins over an error from our side of the stream racing it (grpcio
            # can raise "Internal error from Core" when the server refuses while requests are still written).
            code = await call.code()
            details = await call.details()
            raise RewardServiceError(code, details or error.details() or "") from None
        finally:
            call.cancel()
        if source.unanswered or not source.exhausted:
            raise RewardServiceError(
                grpc.StatusCode.UNKNOWN, f"stream ended with {len(source.unanswered)} requests unanswered"
            )


class _StreamSource:
    """The requests of a `stream_scores` call, numbered, with those sent but not answered kept for resending."""

    def __init__(self, requests: Iterable[Sequence[pb.Sample]] | AsyncIterable[Sequence[pb.Sample]]):
        self._requests = requests
        self._iterator: Iterator | AsyncIterator | None = None
        self.unanswered: dict[int, Sequence[pb.Sample]] = {}
        self.exhausted = False
        self._next_index = 0
        self._reading: asyncio.Future | None = None
        self._generation = 0

    async def resend_then_next(self) -> AsyncIterator[tuple[int, Sequence[pb.Sample]]]:
        """What one stream sends. A broken stream's sender may still be running when the next stream's
        starts: only the newest takes requests from the iterator (the older stops, taking nothing)."""
        self._generation += 1
        mine = self._generation
        for index, samples in sorted(self.unanswered.items()):
            yield index, samples
        while not self.exhausted:
            samples = await self._next()
            if mine != self._generation:
                return
            self._reading = None  # taken: the next read starts a new one
            if samples is _END:
                self.exhausted = True
                return
            index, self._next_index = self._next_index, self._next_index + 1
            self.unanswered[index] = samples
            yield index, samples

    async def _next(self):
        """The next request, or _END, read in a task that outlives a stream broken meanwhile (shielded): a
        request taken from the iterator is never lost, the next stream's sender gets it."""
        if self._iterator is None:
            is_async = isinstance(self._requests, AsyncIterable)
            self._iterator = aiter(self._requests) if is_async else iter(self._requests)
        if self._reading is None:
            if isinstance(self._iterator, AsyncIterator):
                self._reading = asyncio.ensure_future(anext(self._iterator, _END))
            else:  # a slow generator must not block the loop
                self._reading = asyncio.ensure_future(asyncio.to_thread(next, self._iterator, _END))
        return await asyncio.shield(self._reading)


_END = object()


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {sorted(TRUNCATION)}, not {truncation!r}")


def _left(deadline: float | None) -> float | None:
    """Seconds until a time.monotonic() deadline (None: no deadline)."""
    return None if deadline is None else deadline - time.monotonic()


def _status_code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


class RewardClient:
    """Blocking client with the methods of `AsyncRewardClient`; it runs one in a private event-loop thread,
    so it also works where an event loop is already running (notebooks, trainers' async code)."""

    def __init__(self, target: str | Sequence[str], **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rm-client", daemon=True)
        self._thread.start()
        self._client: AsyncRewardClient = self._run(self._open(target, options))

    @staticmethod
    async def _open(target, options) -> AsyncRewardClient:
        return AsyncRewardClient(target, **options)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    @property
    def last_models(self) -> tuple[str, ...]:
        return self._client.last_models

    def score(self, prompts: Sequence[str], responses: Sequence[str], **kw: Any) -> np.ndarray:
        return self._run(self._client.score(prompts, responses, **kw))

    def score_conversations(self, conversations: Sequence[Conversation], **kw: Any) -> np.ndarray:
        return self._run(self._client.score_conversations(conversations, **kw))

    def score_tokens(self, sequences: Sequence[Sequence[int]], **kw: Any) -> np.ndarray:
        return self._run(self._client.score_tokens(sequences, **kw))

    def score_completions(self, prompts: Sequence, completions: Sequence, **kw: Any) -> np.ndarray:
        return self._run(self._client.score_completions(prompts, completions, **kw))

    def score_steps(self, prompts: Sequence[str], solutions: Sequence[Sequence[str]], **kw: Any) -> StepScores:
        return self._run(self._client.score_steps(prompts, solutions, **kw))

    def score_samples(self, samples: Sequence[pb.Sample], **kw: Any) -> np.ndarray:
        return self._run(self._client.score_samples(samples, **kw))

    def compare(self, prompt: str, response_a: str, response_b: str) -> Comparison:
        return self._run(self._client.compare(prompt, response_a, response_b))

    def rank(self, prompt: str, responses: Sequence[str]) -> Ranking:
        return self._run(self._client.rank(prompt, responses))

    def model_info(self) -> pb.ModelInfo:
        return self._run(self._client.model_info())

    def health(self, service: str = "") -> str:
        return self._run(self._client.health(service))

    def reload_models(self) -> pb.ReloadModelsResponse:
        return self._run(self._client.reload_models())
