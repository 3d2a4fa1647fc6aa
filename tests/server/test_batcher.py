"""The dynamic batcher with a recording fake engine: budgets, length grouping, splitting, failures, cancels."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from rm_server.errors import InferenceFailed, NotReady, QueueFull
from rm_server.runtime.batcher import Batcher, BatcherConfig


class RecordingEngine:
    """Reward = sum of the real ids of a row; records every batch it is given; can be gated or made to fail."""

    def __init__(self, fail_on_length: int | None = None):
        self.batches: list[tuple[int, int]] = []  # (rows, padded length)
        self.fail_on_length = fail_on_length
        self.gate = threading.Event()
        self.gate.set()

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if not self.gate.wait(10):  # a test that never opens the gate fails instead of passing late
            raise RuntimeError("the test never opened the engine's gate")
        self.batches.append(input_ids.shape)
        if self.fail_on_length is not None and (attention_mask.sum(1) == self.fail_on_length).any():
            raise RuntimeError("injected failure")
        return (input_ids * attention_mask).sum(1).astype(np.float32)


def run(coro):
    return asyncio.run(coro)


async def with_batcher(engine, config: BatcherConfig, body):
    batcher = Batcher(engine, config)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def test_requests_are_reassembled_in_order_across_batches():
    engine = RecordingEngine()
    sequences = [[i] * (1 + i % 7) for i in range(1, 40)]

    async def body(batcher):
        return await batcher.score(sequences)

    result = run(with_batcher(engine, BatcherConfig(max_batch_tokens=64, max_batch_size=8, max_delay_ms=1), body))
    assert result.rewards.tolist() == [float(sum(s)) for s in sequences]
    assert len(engine.batches) > 1  # split across batches
    assert all(rows <= 8 and rows * length <= 64 for rows, length in engine.batches)


def test_rows_are_reported_as_their_batches_finish():
    """`on_row` (what the reward cache answers waiting requests with) gets every row's reward, each as its
    batch is done: the first rows before the request has its last batch."""
    engine = RecordingEngine()
    sequences = [[i] * 4 for i in range(1, 17)]
    reported: list[tuple[int, float, int]] = []  # (row, reward, batches run by then)

    async def body(batcher):
        return await batcher.score(sequences, lambda i, r: reported.append((i, r, len(engine.batches))))

    result = run(with_batcher(engine, BatcherConfig(max_batch_tokens=16, max_batch_size=4), body))
    assert sorted((i, r) for i, r, _ in reported) == [(i, float(4 * (i + 1))) for i in range(16)]
    assert result.rewards.tolist() == [r for _, r in sorted((i, r) for i, r, _ in reported)]
    assert len(engine.batches) == 4 and min(batches for *_, batches in reported) < 4


def test_batches_start_with_the_oldest_sample_and_group_similar_lengths():
    engine = RecordingEngine()
    engine.gate.clear()  # hold the engine so requests pile up in the queue

    async def body(batcher):
        # arrival order: one short, eight long, seven short; FIFO batches of 8 would mix the lengths
        requests = ([[1] * 2], [[1] * 30] * 8, [[1] * 2] * 7)
        tasks = [asyncio.create_task(batcher.score(seq)) for seq in requests]
        await asyncio.sleep(0.05)
        engine.gate.set()
        return await asyncio.gather(*tasks)

    results = run(with_batcher(engine, BatcherConfig(max_batch_tokens=10_000, max_batch_size=8, max_delay_ms=1), body))
    assert [r.rewards.tolist() for r in results] == [[2.0], [30.0] * 8, [2.0] * 7]
    assert engine.batches == [(8, 2), (8, 30)]  # shorts together (led by the oldest), then the longs


def test_a_full_queue_refuses_at_once():
    engine = RecordingEngine()

    async def body(batcher):
        with pytest.raises(QueueFull, match="queue full"):
            await batcher.score([[1]] * 5)

    run(with_batcher(engine, BatcherConfig(max_batch_tokens=16384, max_queue=4), body))


def test_an_inference_failure_fails_only_that_batch():
    engine = RecordingEngine(fail_on_length=5)
    engine.gate.clear()

    async def body(batcher):
        bad = asyncio.create_task(batcher.score([[1] * 5]))
        good = asyncio.create_task(batcher.score([[1] * 40]))
        await asyncio.sleep(0.05)
        engine.gate.set()
        with pytest.raises(InferenceFailed, match="injected failure"):
            await bad
        assert (await good).rewards.tolist() == [40.0]
        return (await batcher.score([[2, 2]])).rewards.tolist()  # still serving

    # a budget of 40 tokens keeps the two requests in different batches
    assert run(with_batcher(engine, BatcherConfig(max_batch_tokens=40, max_delay_ms=1), body)) == [4.0]


def test_cancelled_requests_leave_the_queue():
    engine = RecordingEngine()
    engine.gate.clear()

    async def body(batcher):
        first = asyncio.create_task(batcher.score([[1] * 3]))
        await asyncio.sleep(0.02)  # the first batch is now inside the (held) engine
        doomed = asyncio.create_task(batcher.score([[7] * 3] * 10))
        await asyncio.sleep(0.02)
        assert batcher.queue_depth == 10
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        assert batcher.queue_depth == 0
        engine.gate.set()
        await first
        return engine.batches

    batches = run(with_batcher(engine, BatcherConfig(max_batch_tokens=16384, max_delay_ms=1), body))
    assert batches == [(1, 3)]  # the cancelled rows never reached the engine


def test_the_next_full_batch_is_formed_while_the_engine_runs_and_a_partial_one_waits():
    engine = RecordingEngine()
    engine.gate.clear()

    async def body(batcher):
        first = asyncio.create_task(batcher.score([[1] * 4]))
        await asyncio.sleep(0.02)  # the first batch is now inside the (held) engine
        partial = asyncio.create_task(batcher.score([[2] * 4] * 3))
        await asyncio.sleep(0.02)
        waiting_partial = batcher.queue_depth  # not enough for a batch: it waits for the engine, gathering
        full = asyncio.create_task(batcher.score([[3] * 4] * 8))
        await asyncio.sleep(0.02)
        waiting_full = batcher.queue_depth  # a full batch (requests taking turns) left the queue, padded
        engine.gate.set()
        results = await asyncio.gather(first, partial, full)
        return waiting_partial, waiting_full, [r.rewards.tolist() for r in results]

    config = BatcherConfig(max_batch_tokens=10_000, max_batch_size=8, max_delay_ms=1)
    waiting_partial, waiting_full, rewards = run(with_batcher(engine, config, body))
    assert (waiting_partial, waiting_full) == (3, 3)
    assert rewards == [[4.0], [8.0] * 3, [12.0] * 8]
    assert engine.batches == [(1, 4), (8, 4), (3, 4)]


class LengthlessSequence(list):
    """A sequence the batching loop itself chokes on (its length reads once, at admission, and then cannot
    be read): a stand-in for any bug outside the engine call."""

    reads = 0

    def __len__(self) -> int:
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("injected batching-loop failure")
        return super().__len__()


def test_a_failing_metrics_callback_costs_no_answer():
    def broken_metrics(stats) -> None:
        raise RuntimeError("injected metrics failure")

    async def body():
        batcher = Batcher(RecordingEngine(), BatcherConfig(max_batch_tokens=64), on_batch=broken_metrics)
        batcher.start()
        try:
            first = await asyncio.wait_for(batcher.score([[1, 2]]), 5)
            second = await asyncio.wait_for(batcher.score([[3]]), 5)
            return first.rewards.tolist(), second.rewards.tolist()
        finally:
            await batcher.stop()

    assert run(body()) == ([3.0], [3.0])


def test_a_batching_loop_failure_fails_its_requests_and_the_loop_goes_on():
    async def body(batcher):
        bad = asyncio.create_task(batcher.score([[1, 2], LengthlessSequence([5])]))
        with pytest.raises(InferenceFailed, match="injected batching-loop failure"):
            await asyncio.wait_for(bad, 5)  # answered with the failure, not left to hang to its deadline
        return (await asyncio.wait_for(batcher.score([[2, 2]]), 5)).rewards.tolist()

    assert run(with_batcher(RecordingEngine(), BatcherConfig(max_batch_tokens=64, max_delay_ms=1), body)) == [4.0]


def test_stopping_fails_the_requests_it_holds_at_once():
    engine = RecordingEngine()
    engine.gate.clear()

    async def body():
        batcher = Batcher(engine, BatcherConfig(max_batch_tokens=64, max_batch_size=1))
        batcher.start()
        running = asyncio.create_task(batcher.score([[1]]))  # in the (held) engine
        waiting = asyncio.create_task(batcher.score([[2]] * 3))  # in the queue
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        engine.gate.set()  # let the engine thread finish, so the executor can shut down
        await asyncio.wait_for(stopping, 5)
        return await asyncio.gather(running, waiting, return_exceptions=True)

    outcomes = run(body())
    assert all(isinstance(o, NotReady) for o in outcomes), outcomes


def test_max_delay_waits_then_runs_a_partial_batch():
    """The batch that is not full runs once max_delay_ms has passed, on Python 3.10 too, where the wait's
    asyncio.wait_for raises a TimeoutError of another class (uncaught, it would end the batching loop)."""

    async def body(batcher):
        started = time.perf_counter()
        result = await asyncio.wait_for(batcher.score([[1, 1]]), 5)
        return result.rewards.tolist(), time.perf_counter() - started

    config = BatcherConfig(max_batch_tokens=10_000, max_batch_size=8, max_delay_ms=50)
    rewards, elapsed = run(with_batcher(RecordingEngine(), config, body))
    assert rewards == [2.0] and 0.04 < elapsed < 5


def test_max_delay_counts_from_the_oldest_request_wherever_its_turn_is():
    """A request served in part goes to the back of the turn order, behind newer ones; its remaining samples
    still wait at most max_delay_ms from its own arrival, not from the arrival of the request now in front
    (counting from the newer one's arrival would hold them 3 s longer here)."""
    engine = RecordingEngine()
    engine.gate.clear()

    async def body(batcher):
        held = [asyncio.create_task(batcher.score([[9] * 2] * 4)) for _ in range(2)]  # fill the engine pipeline
        await asyncio.sleep(0.05)
        arrived = time.perf_counter()
        older = asyncio.create_task(batcher.score([[1] * 2] * 5))  # 4 run next, 1 waits
        await asyncio.sleep(3)
        newer = asyncio.create_task(batcher.score([[1] * 50]))  # other length: not in older's batch
        await asyncio.sleep(0.05)
        engine.gate.set()
        await older
        waited = time.perf_counter() - arrived
        await asyncio.gather(newer, *held)
        return waited

    config = BatcherConfig(max_batch_tokens=10_000, max_batch_size=4, max_delay_ms=4000)
    waited = run(with_batcher(engine, config, body))
    assert engine.batches[2] == (4, 2) and engine.batches[3] == (2, 50)  # older's 4, then its last with newer
    assert 3.9 < waited < 5.5  # its own arrival + 4 s; from the newer request's it would be 7 s


def test_a_request_reaching_a_stopped_batcher_is_refused_not_left_waiting():
    """A request that finishes tokenizing after its model version was unloaded (a reload under load, past
    --grace-s) is refused with NotReady at once, not queued on the stopped batcher to wait forever."""

    async def body():
        batcher = Batcher(RecordingEngine(), BatcherConfig(max_batch_tokens=64))
        batcher.start()
        await batcher.stop()
        with pytest.raises(NotReady, match="unloaded or the server is shutting down"):
            await asyncio.wait_for(batcher.score([[1, 2]]), 5)

    run(body())


def test_a_sample_over_the_token_budget_runs_alone_instead_of_never():
    """rm-serve keeps the budget at or above the model's max length, but a batcher built with less must
    not spin: a sample over the budget runs in a batch of its own, and the batching loop yields."""
    engine = RecordingEngine()

    async def body(batcher):
        return (await asyncio.wait_for(batcher.score([[1] * 100]), 5)).rewards.tolist()

    assert run(with_batcher(engine, BatcherConfig(max_batch_tokens=64), body)) == [100.0]
    assert engine.batches == [(1, 100)]


def test_a_new_request_runs_right_after_the_running_batch_without_bulk_rows():
    """Requests take turns, and the batch formed behind the running one is formed again for a request that
    just arrived, whose short sample's batch takes no rows over twice its length: its wait is the rest of the
    running batch plus its own short batch. In arrival order it waited for the whole large request (tens of
    seconds under maximum-size requests in bench/stall_bench.py); with the batches in hand kept and padded to
    the bulk's length, about 2 s per 1-sample call while 4,096 samples were scored (issue 27)."""
    engine = RecordingEngine()
    engine.gate.clear()  # the large request's first batch waits in the engine, its second formed behind it

    async def body(batcher):
        large = asyncio.create_task(batcher.score([[1] * 100] * 64))  # 8 batches of 8
        await asyncio.sleep(0.05)
        small = asyncio.create_task(batcher.score([[2] * 3]))
        await asyncio.sleep(0.05)
        engine.gate.set()
        return await small, await large

    small, large = run(with_batcher(engine, BatcherConfig(max_batch_tokens=10_000, max_batch_size=8), body))
    assert engine.batches[:3] == [(8, 100), (1, 3), (8, 100)]
    assert small.rewards.tolist() == [6.0] and large.rewards.tolist() == [100.0] * 64


def test_new_requests_jumping_ahead_never_starve_a_request_already_served():
    """Jumps spend a credit that only the served requests' batches earn: clients that always have a new
    request waiting take turns with a bulk request instead of holding it back until they stop."""
    engine = RecordingEngine()
    answered = 0
    large_done = asyncio.Event()

    async def client(batcher):
        nonlocal answered
        while not large_done.is_set() and answered < 2000:  # bounded: without the credit it never ends
            await batcher.score([[2] * 40])  # never in the large request's batches (over half its length)
            answered += 1

    async def body(batcher):
        clients = [asyncio.create_task(client(batcher)) for _ in range(16)]
        await asyncio.sleep(0.01)
        await batcher.score([[1] * 100] * 64)  # 8 batches of 8
        large_done.set()
        await asyncio.gather(*clients)
        return answered

    answered_meanwhile = run(with_batcher(engine, BatcherConfig(max_batch_tokens=800, max_batch_size=8), body))
    # per large batch (800 tokens earned): three jumping batches of 8 clients' samples (320 tokens each) and
    # the turns of those ahead of it: about 50 answers, 400 in all (without the credit: all 2,000)
    assert answered_meanwhile < 1000
