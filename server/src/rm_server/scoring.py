"""Scoring in domain terms: validate, tokenize off the event loop, batch, normalize. No protobuf here."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from rm_contract.bundle import Bundle
from rm_contract.recipe import EncodedSample, RecipeError, Sample, SampleEncoder
from rm_server.batcher import Batcher
from rm_server.errors import InvalidRequest, QueueFull


@dataclass(frozen=True)
class TokenInput:
    """Pre-tokenized ids, scored as they are."""

    ids: tuple[int, ...]


SampleInput = Sample | TokenInput


@dataclass(frozen=True)
class SampleScore:
    reward: float
    num_tokens: int
    truncated: bool


@dataclass(frozen=True)
class Timing:
    queue_ms: float
    tokenization_ms: float
    inference_ms: float
    total_ms: float


@dataclass(frozen=True)
class ScoreOutcome:
    results: list[SampleScore]
    timing: Timing
    normalized: bool


@dataclass(frozen=True)
class Limits:
    max_samples_per_request: int
    """From ModelSettings (the --max-samples-per-request flag)."""
    max_admitted: int = 8192
    """Samples held at once (being tokenized, waiting or being scored): from --max-queue."""
    max_chars_per_sample: int = 1_000_000
    """Text longer than this is refused before tokenization (tokenizing it would stall a worker)."""

    def check_count(self, samples: int) -> None:
        """Refuse a request by its sample count alone: transports call this on the wire message, before
        converting anything (a million tiny samples once froze the event loop for seconds)."""
        if not samples:
            raise InvalidRequest("request has no samples")
        if samples > self.max_samples_per_request:
            raise InvalidRequest(
                f"request has {samples} samples; at most {self.max_samples_per_request} are accepted per request"
            )


class Scorer:
    """Everything a transport needs to score samples with one bundle."""

    def __init__(
        self,
        bundle: Bundle,
        encoder: SampleEncoder,
        variant: str,
        batcher: Batcher,
        limits: Limits,
        tokenizer_threads: int = 2,
    ):
        self.bundle = bundle
        self.variant = variant
        self.batcher = batcher
        self.limits = limits
        self.encoder = encoder
        self.vocab_size = self.encoder.tokenizer.get_vocab_size(with_added_tokens=True)
        self.max_length = bundle.recipe.max_length
        self.keep_first_id = bundle.manifest.get("pooling") == "cls"
        """Over-long token ids keep their first id where the head reads it ([CLS]), beside their end."""
        normalization = bundle.manifest.get("normalization") or {}
        self.norm_mean = float(normalization.get("mean", 0.0))
        self.norm_std = float(normalization.get("std", 1.0)) or 1.0
        self._tokenize_pool = ThreadPoolExecutor(max_workers=tokenizer_threads, thread_name_prefix="tokenize")
        self.admitted = 0
        """Samples of the requests in progress, from admission to answer."""

    def close(self) -> None:
        # queued tokenizations still run and then meet the stopped batcher (NotReady): cancelling them would
        # end their calls with a bare CancelledError, which gRPC answers with no status at all
        self._tokenize_pool.shutdown(wait=False)

    async def score(self, inputs: list[SampleInput], normalize: bool = False, strict: bool = False) -> ScoreOutcome:
        started = time.perf_counter()
        self.limits.check_count(len(inputs))
        self._admit(len(inputs))
        gone = threading.Event()
        try:
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(self._tokenize_pool, self._encode_all, inputs, strict, gone)
            tokenized = time.perf_counter()
            result = await self.batcher.score([e.ids for e in encoded])
        finally:
            gone.set()  # a call cancelled or past its deadline stops tokenizing at its next sample
            self.admitted -= len(inputs)
        rewards = result.rewards.astype(np.float64)
        if normalize:
            rewards = (rewards - self.norm_mean) / self.norm_std
        results = [SampleScore(float(r), len(e.ids), e.truncated) for r, e in zip(rewards, encoded)]
        timing = Timing(
            queue_ms=1000 * result.queue_s,
            tokenization_ms=1000 * (tokenized - started),
            inference_ms=1000 * result.inference_s,
            total_ms=1000 * (time.perf_counter() - started),
        )
        return ScoreOutcome(results, timing, normalize)

    def _admit(self, samples: int) -> None:
        """Refuse before any work when the samples already held and these would exceed the bound: under
        overload a request is turned away in microseconds instead of after its tokenization."""
        if self.admitted + samples > self.limits.max_admitted:
            raise QueueFull(
                f"queue full: {self.admitted} samples held (tokenizing, waiting or being scored), {samples} more "
                f"exceed max_queue {self.limits.max_admitted}; retry with backoff"
            )
        self.admitted += samples

    def _encode_all(self, inputs: list[SampleInput], strict: bool, gone: threading.Event) -> list[EncodedSample]:
        encoded = []
        for i, sample in enumerate(inputs):
            if gone.is_set():  # nobody waits for the answer: free the tokenizer thread for the others
                raise RequestGone
            encoded.append(self._encode(i, sample, strict))
        return encoded

    def _encode(self, index: int, sample: SampleInput, strict: bool) -> EncodedSample:
        if isinstance(sample, TokenInput):
            encoded = self._encode_ids(index, sample.ids)
        else:
            chars = sum(len(m.content) for m in sample.prompt + sample.response)
            if chars > self.limits.max_chars_per_sample:
                raise InvalidRequest(
                    f"sample {index}: {chars} characters; at most {self.limits.max_chars_per_sample} are accepted"
                )
            try:
                encoded = self.encoder.encode(sample)
            except RecipeError as e:
                raise InvalidRequest(f"sample {index}: {e}") from None
        if strict and encoded.truncated:
            raise InvalidRequest(
                f"sample {index}: longer than the model's maximum of {self.max_length} tokens (strict truncation)"
            )
        return encoded

    def _encode_ids(self, index: int, ids: tuple[int, ...]) -> EncodedSample:
        if not ids:
            raise InvalidRequest(f"sample {index}: empty token ids")
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"sample {index}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_length:  # keep the end (the response; a decoder's pooled last token)
            head = list(ids[:1]) if self.keep_first_id else []  # and a cls-pooled encoder's pooled first token
            return EncodedSample(head + list(ids[len(ids) - self.max_length + len(head) :]), True)
        return EncodedSample(list(ids), False)


class RequestGone(Exception):
    """Tokenization stopped because its call was cancelled or expired; nobody reads this."""


def preference_probability(reward_a: float, reward_b: float) -> float:
    """Bradley-Terry: P(A preferred to B) = sigmoid(r_A - r_B)."""
    return 1.0 / (1.0 + math.exp(-(reward_a - reward_b)))
