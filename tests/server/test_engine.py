"""The IO-binding engine path (the one a GPU runs) on the CPU provider: equal to a plain run for every
batch shape, stale buffer contents never leak into a smaller batch, and oversize batches still run."""

from __future__ import annotations

import numpy as np
import pytest

from rm_contract.bundle import load_bundle
from rm_contract.padding import pad_batch
from rm_server.batcher import budget_from_memory
from rm_server.engine import OnnxEngine


@pytest.fixture(scope="module")
def engines(encoder_bundle):
    path = load_bundle(encoder_bundle).model_path("fp32")
    plain, bound = OnnxEngine(path), OnnxEngine(path)
    bound.reserve(tokens=512, rows=8)
    return plain, bound


def random_sequences(rng: np.random.Generator, rows: int, longest: int) -> list[list[int]]:
    return [rng.integers(1000, 2000, size=int(rng.integers(1, longest + 1))).tolist() for _ in range(rows)]


def test_bound_batches_equal_plain_runs_whatever_came_before(engines):
    plain, bound = engines
    rng = np.random.default_rng(0)
    # big batches first, then smaller ones: leftovers of the bigger batch sit in the buffers
    for rows, longest in [(8, 64), (3, 20), (1, 5), (8, 8), (2, 64)]:
        ids, mask = pad_batch(random_sequences(rng, rows, longest), 0)
        expected = plain.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        got = bound.score(ids, mask)
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
