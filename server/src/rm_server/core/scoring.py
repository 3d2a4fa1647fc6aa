"""One model version's scoring: validate, tokenize off the event loop, batch (through the cache), normalize."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from rm_contract.bundle import Bundle
from rm_contract.packing import StepIds
from rm_contract.recipe import EncodedSample, Sample, TextInput, keep_last_ids
from rm_server.core.inputs import Limits, SampleInput, TokenInput, characters
from rm_server.core.results import SampleScore, ScoreOutcome, Timing
from rm_server.errors import InferenceFailed, InvalidRequest, NotReady, QueueFull, TokenizationFailed
from rm_server.runtime.batcher import Batcher, JobResult
from rm_server.runtime.cache import RewardCache
from rm_server.runtime.tokenizer_processes import (
    Encoded,
    RequestTokenizer,
    TokenizerClosed,
    TokenizerCrashed,
    chunks,
)


class Scorer:
    """Everything a transport needs to score samples with one bundle."""

    def __init__(
        self,
        bundle: Bundle,
        tokenizer: RequestTokenizer,
        variant: str,
        batcher: Batcher,
        limits: Limits,
        cache: RewardCache | None = None,
    ):
        self.bundle = bundle
        self.cache = cache
        self.variant = variant
        self.batcher = batcher
        self.limits = limits
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.max_length = bundle.recipe.max_length
        self.keep_first_id = bundle.manifest.get("pooling") == "cls"
        """Over-long token ids keep their first id where the head reads it ([CLS]), beside their end."""
        normalization = bundle.manifest.get("normalization") or {}
        self.norm_mean = float(normalization.get("mean", 0.0))
        self.norm_std = float(normalization.get("std", 1.0)) or 1.0
        self.step_id: int | None = bundle.manifest.get("step_token_id") if bundle.output_kind == "steps" else None
        """A process reward model's step token: each sample is scored at every one of its steps."""
        self._tokenize_pool = ThreadPoolExecutor(max_workers=tokenizer.threads, thread_name_prefix="tokenize")
        self.admitted = 0
        """Samples of the requests in progress, from admission to answer."""

    def close(self) -> None:
        # queued tokenizations still run and then meet the closed tokenizer or the stopped batcher (NotReady):
        # cancelling them would end their calls with a bare CancelledError, which gRPC answers with no status
        self._tokenize_pool.shutdown(wait=False)

    async def score(
        self,
        inputs: list[SampleInput],
        normalize: bool = False,
        strict: bool = False,
        max_tokens: int | None = None,
        step_reduce: str = "min",
    ) -> ScoreOutcome:
        """Rewards of `inputs` in order. Over-long inputs are truncated by the recipe's policy, or refused with
        `strict`; `max_tokens` (vLLM's truncate_prompt_tokens) then keeps at most that many ids, the last.
        A process reward model answers each sample's step scores and their `step_reduce` as its reward."""
        started = time.perf_counter()
        self.limits.check_count(len(inputs))
        if self.step_id is not None and normalize:
            raise InvalidRequest("normalize applies to sequence reward models; this one scores steps (P(correct))")
        as_steps = next((i for i, s in enumerate(inputs) if isinstance(s, Sample) and s.steps is not None), None)
        if self.step_id is None and as_steps is not None:
            raise InvalidRequest(f"sample {as_steps}: sent as steps, but this model scores whole sequences")
        if max_tokens is not None and not 1 <= max_tokens <= self.max_length:
            raise InvalidRequest(
                f"truncate_prompt_tokens={max_tokens}: must be -1 (the model's maximum) or 1 to the model's maximum "
                f"of {self.max_length} tokens"
            )
        for index, sample in enumerate(inputs):  # every sample's size before tokenizing any (len() is O(1))
            self._check_chars(index, characters(sample))
        self._admit(len(inputs))
        gone = threading.Event()
        try:
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(
                self._tokenize_pool, self._encode_all, inputs, strict, max_tokens, gone
            )
            tokenized = time.perf_counter()
            sequences = [e.ids if e.steps is None else StepIds(e.ids, e.steps) for e in encoded]
            batched = JobResult(np.empty(0, np.float32), 0.0, 0.0)

            async def compute(todo: list[Sequence[int]], on_row=None) -> np.ndarray:
                nonlocal batched
                batched = await self.batcher.score(todo, on_row)
                return batched.rewards

            if self.cache is None:
                raw = await compute(sequences)
            else:  # the keys are made off the event loop: they copy every id
                keys = await loop.run_in_executor(self._tokenize_pool, lambda: list(map(RewardCache.key, sequences)))
                raw = await self.cache.rewards(sequences, compute, keys)
        finally:
            gone.set()  # a call cancelled or past its deadline stops tokenizing at its next chunk
            self.admitted -= len(inputs)
        steps = list(raw) if self.step_id is not None else None
        if steps is not None:  # every step checked, not only the one a reduction picks
            raw = np.array([reduce_steps(s, step_reduce) if np.all(np.isfinite(s)) else np.nan for s in steps])
        bad = np.flatnonzero(~np.isfinite(raw))
        if bad.size:  # answered as a failure: a trainer must never take NaN or inf for a reward
            raise InferenceFailed(
                f"the model gave a non-finite reward ({raw[bad[0]]}) for sample {bad[0]} ({bad.size} of "
                f"{len(raw)} samples): an overflow in the graph (an fp16 variant on long inputs?)"
            )
        rewards = raw.astype(np.float64)
        if normalize:
            rewards = (rewards - self.norm_mean) / self.norm_std
        results = [SampleScore(float(r), len(e.ids), e.truncated) for r, e in zip(rewards, encoded)]
        if steps is not None:
            results = [
                replace(r, step_rewards=tuple(map(float, s)), step_positions=sequences[i].steps)
                for i, (r, s) in enumerate(zip(results, steps))
            ]
        timing = Timing(
            queue_ms=1000 * batched.queue_s,
            tokenization_ms=1000 * (tokenized - started),
            inference_ms=1000 * batched.inference_s,
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

    def _encode_all(
        self, inputs: list[SampleInput], strict: bool, max_tokens: int | None, gone: threading.Event
    ) -> list[EncodedSample]:
        """Token ids are checked here; samples and texts go to a tokenizer process a chunk at a time."""
        encoded = []
        for chunk in chunks([len(s.ids) if isinstance(s, TokenInput) else characters(s) for s in inputs]):
            if gone.is_set():  # nobody waits for the answer: free the tokenizer for the others
                raise RequestGone
            texts = [i for i in chunk if not isinstance(inputs[i], TokenInput)]
            try:
                answers = dict(zip(texts, self.tokenizer.encode([inputs[i] for i in texts]))) if texts else {}
            except TokenizerClosed:
                raise NotReady("the model version was unloaded while this request was tokenized; retry") from None
            except TokenizerCrashed:
                raise TokenizationFailed(
                    f"tokenizer processes died twice while they held samples {chunk.start}-{chunk.stop - 1} of "
                    "this request (the samples may be what kills them)"
                ) from None
            for i in chunk:
                one = self._encode(i, inputs[i], answers.get(i), strict)
                if max_tokens is not None and len(one.ids) > max_tokens:
                    if self.step_id is not None:
                        raise InvalidRequest(
                            f"sample {i}: {len(one.ids)} tokens, over truncate_prompt_tokens={max_tokens}; a process "
                            "reward model's samples are not cut (steps would be lost)"
                        )
                    one = EncodedSample(self._keep_end(one.ids, max_tokens), True)
                if self.step_id is not None and one.steps is None:  # ids and texts: vLLM's rule, every step token
                    one = self._find_steps(i, one)
                encoded.append(one)
        return encoded

    def _encode(self, index: int, sample: SampleInput, answer: Encoded | None, strict: bool) -> EncodedSample:
        if isinstance(answer, str):  # the recipe refused it
            raise InvalidRequest(f"sample {index}: {answer}")
        if isinstance(sample, TokenInput):
            encoded = self._encode_ids(index, sample.ids)
        elif isinstance(sample, TextInput):
            encoded = self._encode_ids(index, answer)
        else:
            encoded = answer
        if strict and encoded.truncated:
            raise InvalidRequest(
                f"sample {index}: longer than the model's maximum of {self.max_length} tokens, and the request "
                "forbids truncation (gRPC: TRUNCATION_POLICY_STRICT; vLLM API: no truncate_prompt_tokens given)"
            )
        return encoded

    def _check_chars(self, index: int, chars: int) -> None:
        if chars > self.limits.max_chars_per_sample:
            raise InvalidRequest(
                f"sample {index}: {chars} characters; at most {self.limits.max_chars_per_sample} are accepted"
            )

    def _encode_ids(self, index: int, ids: Sequence[int]) -> EncodedSample:
        if not ids:
            raise InvalidRequest(f"sample {index}: empty token ids")
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"sample {index}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_length:
            return EncodedSample(self._keep_end(ids, self.max_length), True)
        return EncodedSample(list(ids), False)

    def _find_steps(self, index: int, encoded: EncodedSample) -> EncodedSample:
        """Token ids and rendered texts sent to a process reward model are scored at every step token they
        hold, as vLLM's STEP pooling reads them (a prompt's step tokens count too), and never cut."""
        if encoded.truncated:
            raise InvalidRequest(
                f"sample {index}: longer than the model's maximum of {self.max_length} tokens; a process reward "
                "model's samples are not cut (steps would be lost)"
            )
        steps = tuple(k for k, t in enumerate(encoded.ids) if t == self.step_id)
        if not steps:
            raise InvalidRequest(f"sample {index}: holds no step token (id {self.step_id}): nothing to score")
        return replace(encoded, steps=steps)

    def _keep_end(self, ids: Sequence[int], keep: int) -> list[int]:
        return keep_last_ids(ids, keep, keep_first=self.keep_first_id)


def reduce_steps(scores: np.ndarray, rule: str) -> float:
    """A process reward model's step scores (P(step correct)) as one reward: the weakest step (`min`, the
    default: a solution is as good as its worst step), the final one, all steps right (`product`), `mean`."""
    if rule == "min":
        return float(np.min(scores))
    if rule == "last":
        return float(scores[-1])
    if rule == "product":
        return float(np.prod(scores.astype(np.float64)))
    if rule == "mean":
        return float(np.mean(scores, dtype=np.float64))
    raise ValueError(f"unknown step reduction {rule!r}")  # ScoreRequest refused it before any work


class RequestGone(Exception):
    """Tokenization stopped because its call was cancelled or expired; nobody reads this."""


def sigmoid(x: float) -> float:
    """The logistic function without overflow for any finite x (math.exp(-x) overflows below x = -709)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def preference_probability(reward_a: float, reward_b: float) -> float:
    """Bradley-Terry: P(A preferred to B) = sigmoid(r_A - r_B)."""
    return sigmoid(reward_a - reward_b)
