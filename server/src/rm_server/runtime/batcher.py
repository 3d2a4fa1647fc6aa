"""Dynamic cross-request batching: one asyncio task owns the queue and forms batches for the engine.

Waiting requests take turns: a batch's candidates are drawn round-robin across them, one sample of each
per round in turn order, so a one-sample request is never stuck behind a 4,096-sample one (with one
queue in arrival order it waited for all of it). A batch starts with the first candidate (the next turn's
sample, so nothing starves) and is filled with the candidates closest to it in length (so little padding
is wasted) and at most twice as long or 64 tokens (so a short request's batch is not padded to a bulk request's
length), until the padded token budget (`max_batch_tokens`) or the row cap (`max_batch_size`) is reached,
waiting at most `max_delay_ms` for more work when the batch is not full.

A request that just arrived takes its first turn before the requests already served, and the batch formed
behind the running one but not started yet is formed again for it: its wait is the rest of the running
batch plus its own. Jumps are paid for in tokens: they spend a credit that the batches led by requests
already served earn, at most one batch's worth, so clients that always have a new request waiting take
turns with a bulk request (jumps take at most about half the tokens) instead of holding it back until they stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rm_contract.config_cli import ConfigError
from rm_contract.packing import PackedBatch, ScoringRule, Unit, pack_batch, shared_prefix_units
from rm_contract.padding import pad_batch
from rm_server.errors import InferenceFailed, NotReady, QueueFull
from rm_server.runtime.gpu_memory import free_gpu_memory

log = logging.getLogger(__name__)
PIPELINE_DEPTH = 2
"""Batches in hand at once: one in the engine, the next formed and padded behind it."""
SHORT_ROW_TOKENS = 64
"""A batch led by a short sample may still take rows up to this long (twice the leader's length otherwise)."""


class Engine(Protocol):
    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class PackedEngine(Engine, Protocol):
    packed: bool
    scoring: ScoringRule

    def score_packed(self, batch: PackedBatch) -> np.ndarray: ...


@dataclass(frozen=True)
class BatcherConfig:
    """One batcher's settings (rm-serve's flags of the same names). The rule behind each lives here:
    `validate` its bounds, `resolved` what a token budget of 0 means on the device, `gpu_token_budget` the
    budget sized from free GPU memory."""

    max_batch_tokens: int = 0
    """Tokens computed per batch, padding included (rows x row width); 0: resolved per device (`resolved`)."""
    max_batch_size: int = 64
    """Samples per batch (and the rewards the engine returns at once)."""
    max_delay_ms: float = 0.0
    """Longest wait for more work before running a batch that is not full (0: batches form while the engine
    is busy, and an idle engine starts at once)."""
    max_queue: int = 8192
    """Samples held at most (being tokenized, waiting or being scored)."""
    lookahead: int = 4
    """Batches' worth of the oldest waiting samples among which a batch picks similar lengths."""
    pad_id: int = 0
    packing: bool = True
    """With a packed graph: several samples share a row (`--no-packing`: one sample per row, as padded)."""
    pair_cost: float | None = None
    """Attention's cost per token pair of a row, relative to a token's (`row_cost`): decides when samples
    sharing a prompt compute it once in one wider row. None: measured when the model loads (`measure_pair_cost`)."""

    def validate(self) -> None:
        if self.max_batch_tokens < 0:
            raise ConfigError("--max-batch-tokens must not be negative")
        for name in ("max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_delay_ms < 0:
            raise ConfigError("--max-delay-ms must not be negative")

    def token_budget(self, max_length: int, on_gpu: bool) -> int:
        """`max_batch_tokens` with 0 resolved for the device: 1024 on CPU (bigger batches run slower per
        sample there, docs/benchmarks.md), 16384 on GPU before `gpu_token_budget` sizes it; never below the
        model's max length. ValueError when a longest sample could not fit."""
        if not self.max_batch_tokens:
            return max(16384 if on_gpu else 1024, max_length)
        if self.max_batch_tokens < max_length:
            raise ValueError(
                f"--max-batch-tokens {self.max_batch_tokens} is below the model's max length {max_length}: "
                "a long sample could never be batched"
            )
        return self.max_batch_tokens

    def resolved(self, max_length: int, on_gpu: bool, pad_id: int) -> BatcherConfig:
        return dataclasses.replace(self, max_batch_tokens=self.token_budget(max_length, on_gpu), pad_id=pad_id)


def budget_from_memory(free_bytes: int, bytes_per_token: float, measured_tokens: int, cap: int) -> int:
    """GPU token budget: the `measured_tokens` batch that already ran, plus what 80% of the memory still
    free holds at the measured activation bytes per token, at most `cap` (max rows x max length)."""
    if bytes_per_token <= 0:  # the measurement saw no growth: keep what is known to fit
        return measured_tokens
    return max(measured_tokens, min(cap, measured_tokens + int(0.8 * free_bytes / bytes_per_token)))


_GPU_SIZING = threading.Lock()
"""Models measure free GPU memory and claim their budgets one at a time (see `gpu_token_budget`)."""


def gpu_token_budget(engine: Engine, config: BatcherConfig, max_length: int, name: str) -> int:
    """Run the default budget's worth of longest rows, size the budget from the memory it took, then claim
    it: one batch of the whole budget runs, so ONNX Runtime's arena holds that memory from now on. Sized
    without the claim, each model of a repository (or a reload beside the old version) would count the
    memory the others take later as free, and together they would overcommit the GPU. One model at a time."""
    rows = max(1, config.max_batch_tokens // max_length)
    with _GPU_SIZING:
        before = free_gpu_memory()
        engine.score(*pad_batch([[1] * max_length] * rows, 0))
        after = free_gpu_memory()
        if before is None or after is None:
            log.warning("GPU memory unreadable (nvidia-ml-py); token budget stays %d", config.max_batch_tokens)
            return config.max_batch_tokens
        tokens = rows * max_length
        cap = config.max_batch_size * max_length
        budget = budget_from_memory(after, (before - after) / tokens, tokens, cap) // max_length * max_length
        try:
            engine.score(*pad_batch([[1] * max_length] * (budget // max_length), 0))
        except Exception as e:  # noqa: BLE001 - out of memory after all: keep what is known to fit
            log.warning("%s: a batch of %d padded tokens failed (%s); token budget %d", name, budget, e, tokens)
            return tokens
        log.info(
            "%s: %d padded tokens took %.0f MiB of GPU memory; %.0f MiB free; token budget %d (claimed)",
            name,
            tokens,
            (before - after) / 2**20,
            after / 2**20,
            budget,
        )
        return budget


PAIR_COST_WIDTH = 512
"""The widest row `measure_pair_cost` times (rows of shared prompts rarely need more to show the cost)."""


def measure_pair_cost(engine: PackedEngine, width: int) -> float:
    """Attention's cost per token pair relative to a token's (`row_cost`), from the engine itself: one row
    of `width` ids against four rows of a quarter of it (the same tokens, a quarter of the pairs), the
    faster of two runs each. A row of W tokens costs a*W + b*W^2: the two times give b and a. Never below 0
    (noise), so a model whose attention is cheap shares prompts whenever that saves tokens."""
    quarter = max(1, width // 4)
    sequences = [[1] * quarter] * 4
    narrow = pack_batch(sequences, engine.scoring, packed=False)
    wide = pack_batch(sequences, engine.scoring, layout=[[Unit((i,)) for i in range(4)]])
    best = {}
    for name, batch in [("narrow", narrow), ("wide", wide)] * 2:
        best[name] = min(best.get(name, float("inf")), timed(engine.score_packed, batch)[1])
    w, pairs_narrow, pairs_wide = 4 * quarter, 4 * quarter**2, (4 * quarter) ** 2
    b = max(0.0, (best["wide"] - best["narrow"]) / (pairs_wide - pairs_narrow))
    a = max(1e-12, (best["narrow"] - b * pairs_narrow) / w)
    return b / a


def timed(fn, *args):
    """(fn(*args), seconds it took): measured in the engine thread, so a batch queued behind another is
    not charged for the wait."""
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


@dataclass
class BatchStats:
    """What the batcher reports per batch (for metrics)."""

    rows: int
    """Samples."""
    padded_tokens: int
    """Tokens computed, padding included."""
    real_tokens: int
    """Tokens computed that are not padding (a shared prefix counts once)."""
    inference_s: float
    sample_tokens: int
    """Tokens of the samples (a shared prefix counts once per sample)."""


@dataclass(eq=False)  # identity: jobs live in sets
class _Job:
    """One request's samples on their way through the queue."""

    sequences: Sequence[Sequence[int]]
    future: asyncio.Future
    enqueued: float
    on_row: Callable[[int, float], None] | None = None
    steps: bool = False
    """A process reward model's samples: each one's reward is an array of step scores."""
    rewards: np.ndarray = field(init=False)
    remaining: int = field(init=False)
    waiting: list[int] = field(init=False)
    """Indices of the samples not in a batch yet, in order."""
    queue_s: float = 0.0
    inference_s: float = 0.0
    served: bool = False
    """Some of its samples have been in a batch: it no longer jumps ahead of the others."""

    def __post_init__(self) -> None:
        self.rewards = np.empty(len(self.sequences), dtype=object if self.steps else np.float32)
        self.remaining = len(self.sequences)
        self.waiting = list(range(len(self.sequences)))

    def waiting_tokens(self) -> int:
        return sum(len(self.sequences[i]) for i in self.waiting)


@dataclass(eq=False)
class _Batch:
    rows: list[tuple[_Job, int]]
    layout: list[list[Unit]]
    """Per row of a packed batch, its units (members index `rows`); one sample per row when padded."""
    jump_cost: int
    """Tokens its leader's jump spent from the credit (negative: tokens it earned)."""
    first_served: list[_Job]
    """The requests it served first (new again should it be taken back)."""
    run: concurrent.futures.Future | None = None
    """The engine call: cancelled while still queued behind the running batch, the batch is formed again."""


@dataclass
class JobResult:
    rewards: np.ndarray
    """One float32 per sample; for a process reward model, one float32 array (its step scores) per sample."""
    queue_s: float
    """Until the last of the request's samples entered a batch."""
    inference_s: float
    """Model time of the batches that held the request's samples."""


class Batcher:
    def __init__(self, engine: Engine, config: BatcherConfig, on_batch=None):
        if config.max_batch_tokens < 1:
            raise ValueError("the Batcher needs a resolved token budget (BatcherConfig.resolved)")
        self.engine = engine
        self.config = config
        self.packed = bool(getattr(engine, "packed", False))
        """The engine takes packed batches (a packed bundle); `config.packing` decides whether rows are shared."""
        self.steps = getattr(engine, "scores_per_sample", "one") == "steps"
        """A process reward model's engine: each sample's answer is an array of step scores."""
        self.on_batch = on_batch or (lambda stats: None)
        self._queue: list[_Job] = []
        """Requests with samples not in a batch yet, in arrival order."""
        self._waiting_samples = 0
        self._waiting_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._running: dict[asyncio.Task, _Batch] = {}
        """Batches in hand (PIPELINE_DEPTH at most): in the engine, or formed and queued behind it."""
        self._jump_credit = config.max_batch_tokens
        """Tokens new requests may still spend jumping ahead (see the module's docstring)."""
        self._closed = False
        self._jobs: set[_Job] = set()
        """Every job not answered yet, wherever its samples are (queue, formed batch, engine)."""

    @property
    def queue_depth(self) -> int:
        return self._waiting_samples

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="batcher")

    async def stop(self) -> None:
        """Stop batching; every request not answered yet gets UNAVAILABLE now instead of waiting forever."""
        self._closed = True  # from now on score() refuses at once: nothing would ever run its samples
        tasks = [t for t in (self._task, *self._running) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_all(NotReady("the model was unloaded or the server is shutting down; retry"))
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _supervise(self) -> None:
        """Keep the batching loop alive: should it ever raise, the requests it held fail (INTERNAL) instead
        of waiting for their deadlines, and it starts again for the requests that come next."""
        while True:
            try:
                await self._run()
            except Exception as e:  # noqa: BLE001 - anything but cancellation: fail what is held, go on
                log.exception("the batching loop failed; failing the %d requests it held", len(self._jobs))
                self._fail_all(InferenceFailed(f"batching failed: {type(e).__name__}: {e}"))

    def _fail_all(self, error: Exception) -> None:
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(error)
        self._queue.clear()
        self._waiting_samples = self._waiting_tokens = 0

    async def score(
        self, sequences: Sequence[Sequence[int]], on_row: Callable[[int, float], None] | None = None
    ) -> JobResult:
        """Rewards of `sequences` in order; cancelling the caller drops its waiting samples. `on_row(i,
        reward)` is called as each row's batch finishes, before the whole request has (the cache answers
        requests waiting on one of its rows then)."""
        if self._closed:
            raise NotReady("the model was unloaded or the server is shutting down; retry")
        if self._waiting_samples + len(sequences) > self.config.max_queue:
            raise QueueFull(
                f"queue full: {self._waiting_samples} samples waiting, {len(sequences)} more exceed max_queue "
                f"{self.config.max_queue}; retry with backoff"
            )
        job = _Job(sequences, asyncio.get_running_loop().create_future(), time.perf_counter(), on_row, self.steps)
        tokens = job.waiting_tokens()
        self._queue.append(job)
        self._waiting_samples += len(sequences)
        self._waiting_tokens += tokens
        self._jobs.add(job)
        self._wakeup.set()
        try:
            await job.future
        except asyncio.CancelledError:
            job.future.cancel()
            self._drop_finished()  # its waiting samples leave the queue now
            raise
        finally:
            self._jobs.discard(job)
        return JobResult(job.rewards, job.queue_s, job.inference_s)

    async def _run(self) -> None:
        """Form batches and hand them to the engine thread, keeping at most PIPELINE_DEPTH in hand: while
        one runs, the next (when the queue already fills it) is formed and padded, so the engine never
        waits on the event loop between batches. A batch that is not full waits for the engine instead,
        gathering what arrives meanwhile. A new request that may jump ahead re-forms the batch queued
        behind the running one."""
        while True:
            self._running = {t: b for t, b in self._running.items() if not t.done()}
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._running:
                if self._jump_waiting() and self._take_back_queued_batch():
                    pass  # formed again below, led by the new request
                elif len(self._running) >= PIPELINE_DEPTH or not self._batch_is_full():
                    await self._more_work(also=self._running)  # or the engine finishing a batch
                    continue
            else:
                await self._wait_for_more()
            batch = self._take_batch()
            if batch:
                task = asyncio.get_running_loop().create_task(self._execute(batch), name="batch")
                self._running[task] = batch

    async def _more_work(self, also: Collection[asyncio.Task] = (), timeout: float | None = None) -> bool:
        """Wait until a request arrives, one of `also` finishes, or `timeout` passes; whether anything did.
        asyncio.wait, not wait_for: no timeout exception (a different class before Python 3.11)."""
        self._wakeup.clear()
        wakeup = asyncio.ensure_future(self._wakeup.wait())
        try:
            done, _ = await asyncio.wait({*also, wakeup}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wakeup.cancel()
        return bool(done)

    async def _execute(self, batch: _Batch) -> None:
        """Pad, run in the engine thread, deliver. Whatever fails here (padding, the engine, a wrong number
        of rewards) fails only this batch's requests; the metrics callback failing fails none. A batch taken
        back before the engine started it ends here quietly: its rows are waiting again."""
        rows = batch.rows
        try:
            sequences = [job.sequences[i] for job, i in rows]
            counts = np.ones(len(rows), dtype=np.int64)
            if self.packed:
                packed = pack_batch(sequences, self.engine.scoring, layout=batch.layout)
                computed, real, counts = packed.size, packed.real_tokens, packed.counts
                run = (self.engine.score_packed, packed)
            else:
                input_ids, attention_mask = pad_batch(sequences, self.config.pad_id)
                computed, real = input_ids.size, int(attention_mask.sum())
                run = (self.engine.score, input_ids, attention_mask)
            formed = time.perf_counter()
            for job, _ in rows:
                job.queue_s = max(job.queue_s, formed - job.enqueued)
            batch.run = self._executor.submit(timed, *run)
            try:
                rewards, elapsed = await asyncio.wrap_future(batch.run)
            except asyncio.CancelledError:
                if batch.run.cancelled() and not self._closed:
                    return  # taken back (_take_back_queued_batch)
                raise
            if len(rewards) != counts.sum():
                raise RuntimeError(f"engine returned {len(rewards)} scores for {counts.sum()} score positions")
        except Exception as e:  # noqa: BLE001 - only this batch's requests fail; the server keeps serving
            log.exception("inference failed on a batch of %d rows", len(rows))
            for job, _ in rows:
                if not job.future.done():
                    job.future.set_exception(InferenceFailed(f"inference failed: {type(e).__name__}: {e}"))
            return
        for job in {id(job): job for job, _ in rows}.values():
            job.inference_s += elapsed
        # copies: a view kept by the cache would hold its whole batch's output
        values = [v.copy() for v in np.split(rewards, np.cumsum(counts)[:-1])] if self.steps else rewards.tolist()
        for (job, i), value in zip(rows, values):
            job.rewards[i] = value
            job.remaining -= 1
            if job.on_row is not None and not job.future.done():
                job.on_row(i, value)
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(None)
        try:
            self.on_batch(BatchStats(len(rows), computed, real, elapsed, sum(map(len, sequences))))
        except Exception:  # noqa: BLE001 - metrics must never cost an answer
            log.exception("the per-batch metrics callback failed")

    def _jump_waiting(self) -> bool:
        """A new request waits behind one already served, and the credit lets it go first."""
        return self._jump_credit > 0 and self._first_new_turn() > 0

    def _first_new_turn(self) -> int:
        """The queue position of the first request not served yet (-1: none)."""
        return next((k for k, job in enumerate(self._queue) if not job.served), -1)

    def _take_back_queued_batch(self) -> bool:
        """Return the rows of the batch formed behind the running one to the queue, if the engine has not
        started it; whether it did."""
        queued = [  # never one led by a jump: new requests would take each other's turns back and forth
            (t, b) for t, b in self._running.items() if b.run is not None and not b.run.running() and b.jump_cost <= 0
        ]
        if len(self._running) < PIPELINE_DEPTH or not queued:
            return False
        task, batch = queued[-1]
        if not batch.run.cancel():
            return False  # the engine thread took it meanwhile
        del self._running[task]
        returned: dict[_Job, list[int]] = {}
        for job, i in batch.rows:
            returned.setdefault(job, []).append(i)
        for job, indices in returned.items():
            job.waiting = sorted(job.waiting + indices)
            self._waiting_samples += len(indices)
            self._waiting_tokens += sum(len(job.sequences[i]) for i in indices)
        self._jump_credit += batch.jump_cost
        for job in batch.first_served:
            job.served = False
        # their turn comes back first, as it was before they were taken (new requests still jump ahead)
        self._queue = list(returned) + [job for job in self._queue if job not in returned]
        return True

    async def _wait_for_more(self) -> None:
        """Let a not-yet-full batch gather more work, at most max_delay_ms after its oldest sample arrived."""
        # the oldest request, wherever its turn is (the requests served last are at the back)
        deadline = min(job.enqueued for job in self._queue) + self.config.max_delay_ms / 1000
        while not self._batch_is_full() and (remaining := deadline - time.perf_counter()) > 0:
            if not await self._more_work(timeout=remaining):
                break

    def _batch_is_full(self) -> bool:
        return (
            self._waiting_samples >= self.config.max_batch_size or self._waiting_tokens >= self.config.max_batch_tokens
        )

    def _take_batch(self) -> _Batch | None:
        """The first candidate plus the candidates nearest to it in length, within the budgets.

        Only the first `lookahead` batches' worth of candidates (round-robin across requests) are looked at,
        and the requests served move to the back of the turn order, so every request leads a batch in turn
        and advances at a steady share while padding stays low.
        """
        self._drop_finished()
        jump = self._jump_waiting()
        turns = self._queue
        if jump:  # the new requests first, in arrival order
            turns = [job for job in turns if not job.served] + [job for job in turns if job.served]
        candidates = self._candidates(turns, self.config.lookahead * self.config.max_batch_size)
        if not candidates:
            return None
        lengths = [len(job.sequences[i]) for job, i in candidates]
        if self.packed and self.config.packing:
            chosen, layout, padded = self._choose_packed([job.sequences[i] for job, i in candidates])
        else:
            chosen, padded = self._choose_padded(lengths)
            layout = [[Unit((i,))] for i in range(len(chosen))]
        lengths = [lengths[k] for k in chosen]  # the samples' own tokens, shared prefixes included
        rows = [candidates[k] for k in chosen]
        leader = candidates[0][0]
        if jump and not leader.served:
            cost = padded  # spent by jumping ahead
        elif leader.served:
            cost = -min(padded, self.config.max_batch_tokens - self._jump_credit)  # earned, up to one batch
        else:
            cost = 0  # a new request's turn in arrival order neither spends nor earns
        self._jump_credit -= cost
        taken: dict[_Job, set[int]] = {}
        for job, i in rows:
            taken.setdefault(job, set()).add(i)
        first_served = [job for job in taken if not job.served]
        for job, indices in taken.items():
            job.waiting = [i for i in job.waiting if i not in indices]
            job.served = True
        self._waiting_samples -= len(rows)
        self._waiting_tokens -= sum(lengths)
        # the requests served go to the back: the next batch starts with one that was not (a short request
        # behind a long one would otherwise never lead a batch, and never be nearest the leader's length)
        self._queue = [job for job in self._queue if job not in taken and job.waiting] + [
            job for job in self._queue if job in taken and job.waiting
        ]
        return _Batch(rows, layout, cost, first_served)

    def _choose_padded(self, lengths: list[int]) -> tuple[list[int], int]:
        """The first candidate and those nearest to it in length, at most twice as long (or SHORT_ROW_TOKENS),
        while the padded batch (rows x longest) fits: (chosen, in candidate order; tokens computed)."""
        order = sorted(range(len(lengths)), key=lambda k: (abs(lengths[k] - lengths[0]), k))
        longest_allowed = max(2 * lengths[0], SHORT_ROW_TOKENS)
        chosen, longest = [], 0
        for k in order:
            if len(chosen) == self.config.max_batch_size:
                break
            if lengths[k] > longest_allowed and chosen:
                continue
            if max(longest, lengths[k]) * (len(chosen) + 1) > self.config.max_batch_tokens and chosen:
                continue
            chosen.append(k)
            longest = max(longest, lengths[k])
        return sorted(chosen), longest * len(chosen)

    def _choose_packed(self, sequences: list[Sequence[int]]) -> tuple[list[int], list[list[Unit]], int]:
        """The packed batch led by the first candidate: its unit (for decoders, the candidates sharing its
        prefix: a group's prompt, whichever requests its samples came in) and the units nearest to it in
        width, within the budgets. Returns (chosen, in candidate order; the rows' units, members as indices
        into chosen; tokens computed: rows x the fullest row).

        No row is wider than the widest unit in it: eager attention computes a row's full width squared, so
        rows made wider to hold more samples cost more per token than the padding they save (SmolLM2 on CPU:
        7% at twice the width, 40% at four times; docs/benchmarks.md). Packing fills rows' tails; a unit is
        wider than its members only where `shared_prefix_units` found that cheaper."""
        lengths = [len(ids) for ids in sequences]
        budget, cap = self.config.max_batch_tokens, self.config.max_batch_size
        if self.engine.scoring.shares_prefixes:
            units = shared_prefix_units(sequences, budget, cap, self.config.pair_cost or 0.0)
        else:
            units = [Unit((k,)) for k in range(len(sequences))]
        widths = [unit.width(lengths) for unit in units]
        lead = next(u for u, unit in enumerate(units) if 0 in unit.members)
        longest_allowed = max(2 * widths[lead], SHORT_ROW_TOKENS)
        order = sorted(range(len(units)), key=lambda u: (abs(widths[u] - widths[lead]), min(units[u].members)))
        placed: list[list[int]] = []
        filled: list[int] = []
        widest = fullest = count = 0
        for u in order:
            n, members = widths[u], len(units[u].members)
            if count and (count + members > cap or n > longest_allowed):
                continue
            room = max(widest, n)
            row = next((r for r, used in enumerate(filled) if used + n <= room), None)
            rows = len(placed) + (row is None)
            width = max(fullest, n if row is None else filled[row] + n)
            if rows * width > budget and count:
                continue
            if row is None:
                placed.append([])
                filled.append(0)
                row = len(placed) - 1
            placed[row].append(u)
            filled[row] += n
            widest, fullest, count = room, width, count + members
        chosen = sorted(k for row in placed for u in row for k in units[u].members)
        index = {k: i for i, k in enumerate(chosen)}
        layout = [[Unit(tuple(index[k] for k in units[u].members), units[u].prefix) for u in row] for row in placed]
        return chosen, layout, fullest * len(placed)

    @staticmethod
    def _candidates(turns: list[_Job], limit: int) -> list[tuple[_Job, int]]:
        """Up to `limit` waiting samples in turn order: round r holds the r-th waiting sample of every
        request that has one, requests in `turns` order."""
        candidates: list[tuple[_Job, int]] = []
        active, r = turns, 0
        while active and len(candidates) < limit:
            for job in active:
                candidates.append((job, job.waiting[r]))
                if len(candidates) == limit:
                    break
            r += 1
            active = [job for job in active if len(job.waiting) > r]
        return candidates

    def _drop_finished(self) -> None:
        """Requests answered, failed or cancelled leave the queue with their waiting samples."""
        for job in (j for j in self._queue if j.future.done()):
            self._waiting_samples -= len(job.waiting)
            self._waiting_tokens -= job.waiting_tokens()
            job.waiting = []
        self._queue = [job for job in self._queue if job.waiting]
