"""How cost grows with work: offline throughput against sequence length, and rm-serve throughput and memory
against its max_batch_tokens budget."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence

import loadgen
import numpy as np
import servers

from rm_contract.padding import pad_batch

Score = Callable[[np.ndarray, np.ndarray], np.ndarray]


def offline_best(score: Score, sequences: list[list[int]], pad_id: int, batch_sizes=(8, 16, 32, 64)) -> dict:
    """Length-sorted batches at the best batch size: what a server with zero overhead could reach.

    Measured on a seeded sample of 512 of the load's sequences (same length distribution)."""
    if len(sequences) > 512:
        sequences = random.Random(0).sample(sequences, 512)
    ordered = sorted(sequences, key=len)
    best: dict = {}
    for batch_size in batch_sizes:
        batches = [pad_batch(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
        score(*batches[0])
        started = time.perf_counter()
        for batch in batches:
            score(*batch)
        rate = len(ordered) / (time.perf_counter() - started)
        if rate > best.get("samples_per_s", 0):
            best = {"samples_per_s": round(rate, 1), "batch_size": batch_size}
    best["tokens_per_s"] = round(best["samples_per_s"] * float(np.mean([len(s) for s in sequences])), 1)
    return best


def length_sweep(
    score: Score, token_stream: Sequence[int], lengths: Sequence[int], pad_id: int, tokens_per_point: int = 32768
) -> dict:
    """Offline samples/s and tokens/s on sequences of exactly L real tokens, batched to about 1024 tokens.

    Tokens per second falling as L grows is attention's quadratic term showing."""
    points = {}
    for length in lengths:
        rows = max(1, 1024 // length)
        n = max(rows, tokens_per_point // length)
        starts = range(0, len(token_stream) - length, max(1, (len(token_stream) - length) // n))
        sequences = [list(token_stream[s : s + length]) for s in starts][:n]
        batches = [pad_batch(sequences[i : i + rows], pad_id) for i in range(0, len(sequences), rows)]
        score(*batches[0])
        started = time.perf_counter()
        for batch in batches:
            score(*batch)
        seconds = time.perf_counter() - started
        points[str(length)] = {
            "samples_per_s": round(len(sequences) / seconds, 2),
            "tokens_per_s": round(len(sequences) * length / seconds, 1),
            "batch_rows": rows,
        }
    return points


def budget_sweep(bundle: str, requests: list, budgets: Sequence[int], concurrency: int) -> dict:
    """rm-serve fp32 throughput and peak resident memory per --max-batch-tokens."""
    points = {}
    for budget in budgets:
        with servers.rm_serve(bundle, "fp32", ["--max-batch-tokens", str(budget)]) as (target, process):
            asyncio.run(loadgen.load_grpc(target, requests[:4], 2))
            point = asyncio.run(loadgen.load_grpc(target, requests, concurrency))
            point.pop("_latencies")
            point["peak_rss_mb"] = servers.peak_rss_mb(process.pid)
        points[str(budget)] = point
        print(
            f"  max_batch_tokens {budget}: {point['samples_per_s']} samples/s, {point['peak_rss_mb']} MiB", flush=True
        )
    return points
