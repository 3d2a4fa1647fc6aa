"""Tokenizer processes (`--tokenizer-processes 2`, the default) against tokenization in threads of the
serving process (`--tokenizer-processes 0`), in one run on one machine:

- start-up: seconds from launch to SERVING;
- throughput: 1,000 samples sent one per request all at once, and in 32-sample requests (gRPC);
- a lone 1-sample Score: p50 and p99 of 200 sequential calls;
- a hot reload of a version whose tokenizer.json is 40 MB: the worst 1-sample Score latency while it loads;
- memory: proportional set size (shared pages split) of the server and its tokenizer processes.

    .venv/bin/python bench/tokenizer_bench.py --bundle runs/demo/bundle

Writes bench/results/tokenizer.json; ratios are processes / threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from per_sample_bench import grpc_mode
from serve_bench import demo_pairs, describe_machine

from rm_contract.pb import reward_pb2 as pb
from rm_server.launch import RunningServer, start_server, stop_server

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the repository root, for the test helper below
from tests.bundles import large_vocabulary_copy  # noqa: E402 - the reload test's 40 MB tokenizer, made alike

MODES = {"threads": "0", "processes": "2"}


def pss_mb(pid: int) -> float:
    """Proportional set size of `pid` and every process below it, in MiB (from /proc)."""
    total, frontier = 0.0, [pid]
    while frontier:
        below = []
        for p in frontier:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                below += [int(c) for c in (task / "children").read_text().split()]
        frontier = below
    return round(total, 1)


def lone_calls(server: RunningServer, n: int) -> list[float]:
    stub = server.stub()
    request = pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="Q", response="A short answer."))])
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        stub.Score(request, timeout=60)
        latencies.append(time.perf_counter() - started)
    return latencies


def reload_stall(bundle: Path, large: Path, workdir: Path, processes: str) -> dict:
    """Serve `bundle` as version 1 of a repository, publish `large` as version 2, and call Score every 50 ms
    until version 2 answers."""
    repo = workdir / f"repo-{processes}"
    shutil.copytree(bundle, repo / "toy" / "1")
    server = start_server(
        repo,
        workdir / f"repo-{processes}.log",
        "--poll-s",
        "0.3",
        "--tokenizer-processes",
        processes,
        bundle_flag="--model-repo",
    )
    request = pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="Q", response="A short answer."))])
    try:
        stub = server.stub()
        stub.Score(request, timeout=60)
        shutil.copytree(large, repo / "toy" / ".staging")
        published = time.perf_counter()
        (repo / "toy" / ".staging").rename(repo / "toy" / "2")
        latencies, version = [], "1"
        while version == "1":
            started = time.perf_counter()
            version = stub.Score(request, timeout=120).model_version
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
        return {
            "reload_s": round(time.perf_counter() - published, 2),
            "calls_during_reload": len(latencies),
            "worst_ms": round(1000 * max(latencies), 1),
        }
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="each throughput mode this many times, best kept")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    rng = random.Random(0)
    pairs = demo_pairs()
    samples = [rng.choice(pairs) for _ in range(args.samples)]
    loads = {
        "per_sample": ([[s] for s in samples], len(samples)),
        "batched": ([samples[i : i + 32] for i in range(0, len(samples), 32)], 4),
    }
    result: dict = {"machine": describe_machine(), "samples": len(samples)}
    rewards: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        running = {}
        try:
            for mode, processes in MODES.items():  # started one after the other: start-up is timed alone
                started = time.perf_counter()
                running[mode] = start_server(bundle, workdir / f"{mode}.log", "--tokenizer-processes", processes)
                result[mode] = {"start_up_s": round(time.perf_counter() - started, 2)}
            for round_ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
                for mode, server in running.items():
                    for load, (requests, concurrency) in loads.items():
                        point = asyncio.run(grpc_mode(server.target, requests, concurrency))
                        rewards[f"{mode}_{load}"] = point.pop("_rewards")
                        print(f"round {round_}: {mode} {load} {point['samples_per_s']} samples/s")
                        best = result[mode].get(load, {}).get("samples_per_s", 0)
                        if point["samples_per_s"] > best:
                            result[mode][load] = point
            for mode, server in running.items():
                latencies = np.array(lone_calls(server, 200)) * 1000
                result[mode]["lone_score_p50_ms"] = round(float(np.percentile(latencies, 50)), 2)
                result[mode]["lone_score_p99_ms"] = round(float(np.percentile(latencies, 99)), 2)
                result[mode]["pss_mb"] = pss_mb(server.process.pid)
        finally:
            for server in running.values():
                stop_server(server)
        large = workdir / "large"
        large_vocabulary_copy(bundle, large)
        for mode, processes in MODES.items():
            result[mode]["reload"] = reload_stall(bundle, large, workdir, processes)
            print(f"{mode}: reload {result[mode]['reload']}")
    threads, processes = result["threads"], result["processes"]
    result["ratios_processes_over_threads"] = {
        "per_sample_throughput": round(
            processes["per_sample"]["samples_per_s"] / threads["per_sample"]["samples_per_s"], 3
        ),
        "batched_throughput": round(processes["batched"]["samples_per_s"] / threads["batched"]["samples_per_s"], 3),
        "lone_score_p50": round(processes["lone_score_p50_ms"] / threads["lone_score_p50_ms"], 3),
        "reload_worst_latency": round(processes["reload"]["worst_ms"] / threads["reload"]["worst_ms"], 3),
        "pss": round(processes["pss_mb"] / threads["pss_mb"], 3),
    }
    result["max_reward_difference"] = float(
        max(
            np.max(np.abs(np.array(rewards[f"processes_{load}"]) - np.array(rewards[f"threads_{load}"])))
            for load in loads
        )
    )
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "tokenizer.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
