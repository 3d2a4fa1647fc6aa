"""The IO-binding engine path (the one a GPU runs) on the CPU provider: equal to a plain run for every
batch shape, stale buffer contents never leak into a smaller batch, and oversize batches still run."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rm_contract.bundle import load_bundle
from rm_contract.packing import pack_batch
from rm_contract.padding import pad_batch
from rm_server.core.metrics import ServiceMetrics
from rm_server.core.model_version import ModelVersion
from rm_server.core.settings import ModelSettings
from rm_server.runtime import batcher as batcher_module
from rm_server.runtime.batcher import BatcherConfig, budget_from_memory, gpu_token_budget
from rm_server.runtime.engine import open_engine


@pytest.fixture(scope="module")
def engines(encoder_bundle):
    bundle = load_bundle(encoder_bundle)
    plain, bound = open_engine(bundle, "fp32"), open_engine(bundle, "fp32")
    bound.reserve(tokens=512, samples=8)
    return plain, bound


def random_sequences(rng: np.random.Generator, rows: int, longest: int) -> list[list[int]]:
    return [rng.integers(1000, 2000, size=int(rng.integers(1, longest + 1))).tolist() for _ in range(rows)]


def test_bound_batches_equal_plain_runs_whatever_came_before(engines):
    plain, bound = engines
    rng = np.random.default_rng(0)
    # big batches first, then smaller ones: leftovers of the bigger batch sit in the buffers
    for rows, longest in [(8, 64), (3, 20), (1, 5), (8, 8), (2, 64)]:
        batch = pack_batch(random_sequences(rng, rows, longest), bound.scoring)
        expected = plain.session.run(None, batch.inputs())[0]
        got = bound.score_packed(batch)
        assert got.shape == (rows,) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "rows, longest",
    [(12, 40), (4, 200)],  # more rows than reserved (within the tokens), more tokens than reserved (within the rows)
)
def test_batches_over_the_reserved_size_run_unbound(engines, rows, longest):
    plain, bound = engines
    sequences = random_sequences(np.random.default_rng(1), rows, longest)
    sequences[0] = sequences[0][:1] + [1500] * (longest - 1)  # the longest row sets the padded size
    ids, mask = pad_batch(sequences, 0)
    assert ids.shape == (rows, longest)
    np.testing.assert_allclose(bound.score(ids, mask), plain.score(ids, mask), rtol=0, atol=1e-6)


def test_gpu_budget_from_free_memory():
    mib = 2**20
    # 16384 tokens took 1 GiB (64 KiB per token); 10 GiB free: 80% of it holds 131072 more tokens
    assert budget_from_memory(10 * 1024 * mib, 64 * 1024, 16384, cap=1_000_000) == 16384 + 131072
    assert budget_from_memory(10 * 1024 * mib, 64 * 1024, 16384, cap=65536) == 65536  # at most max rows x length
    assert budget_from_memory(0, 64 * 1024, 16384, cap=65536) == 16384  # never below what already ran
    assert budget_from_memory(10 * 1024 * mib, 0, 16384, cap=65536) == 16384  # no growth seen: keep the default


class ArenaGpu:
    """The memory side of a GPU under ONNX Runtime: each session's arena grows to its largest batch (a byte
    per padded token here) and never shrinks; free memory is what the arenas have not taken."""

    def __init__(self, total: int):
        self.total, self.arenas, self.readers = total, {}, []
        self.lock = threading.Lock()

    def free(self) -> int:
        with self.lock:
            self.readers.append(threading.current_thread().name)
            return self.total - sum(self.arenas.values())

    def attach(self, model: ModelVersion, before_claim=lambda: None) -> None:
        score = model.engine.score

        def score_on_gpu(ids, mask):
            if model.name in self.arenas:  # its second batch: the claim
                before_claim()
            with self.lock:
                self.arenas[model.name] = max(self.arenas.get(model.name, 0), ids.size)
            return score(ids, mask)

        model.engine.score = score_on_gpu


def test_models_sized_on_one_gpu_claim_no_more_than_it_has(encoder_bundle, monkeypatch):
    """Models on one GPU are sized one at a time, each claiming its budget (one full batch) before the next
    measures: a budget is 80% of the memory free when the model measures, and its arena grows to it only when
    a batch that large comes, so two models sized side by side would count the same memory and run the GPU
    out at full load."""
    gpu = ArenaGpu(total=3000)
    monkeypatch.setattr(batcher_module, "free_gpu_memory", gpu.free)
    bundle = load_bundle(encoder_bundle)  # max length 256
    config = BatcherConfig(max_batch_tokens=512, max_batch_size=8)
    a, b = (ModelVersion(name, "1", bundle, ModelSettings(), ServiceMetrics()) for name in ("a", "b"))

    def b_measures_first() -> None:  # the worst interleaving: b reads free memory while a is about to claim
        deadline = time.monotonic() + 1  # b cannot start while a holds the sizing lock: then a goes on
        while gpu.readers.count("b") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    gpu.attach(a, before_claim=b_measures_first)
    gpu.attach(b)
    budgets = {}
    threads = [
        threading.Thread(
            target=lambda m=m: budgets.update({m.name: gpu_token_budget(m.engine, config, 256, m.name)}), name=m.name
        )
        for m in (a, b)
    ]
    threads[0].start()
    while gpu.readers.count("a") < 2:  # a has measured; b starts now
        time.sleep(0.01)
    threads[1].start()
    for thread in threads:
        thread.join(30)
    assert all(budget >= 512 and budget % 256 == 0 for budget in budgets.values())
    assert sum(budgets.values()) <= gpu.total  # both at full load at once still fit
    assert gpu.arenas == budgets  # held from the start, not from the first full batch
