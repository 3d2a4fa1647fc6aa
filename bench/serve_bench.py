"""Serving benchmark: rm-serve under load against the references, measured in one run (`make bench`).

    .venv/bin/python bench/serve_bench.py --bundle runs/demo/bundle --checkpoint runs/demo/rm

Load: closed-loop async gRPC clients at several concurrencies, each sending requests of 1-32 samples
drawn from the demo data (its real length distribution), the same 256 requests (about 4200 samples)
per point. References, on the
same samples: ONNX Runtime offline (length-sorted, best batch size: the limit for this engine), PyTorch
eager offline (same batching), and a naive HTTP + JSON server scoring each request alone. Ratios are what
count: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import report
import torch

from rm_client.demo import free_port, wait_until_serving
from rm_client.pb import reward_pb2 as pb
from rm_client.pb import reward_pb2_grpc
from rm_server.bundle import load_bundle
from rm_server.engine import OnnxEngine, pad_batch
from rm_server.recipe import Sample
from rm_training.model import load_reward_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "rm_training" / "data" / "demo"
BIN = Path(sys.executable).parent


def demo_pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for name in ("test", "train") for line in open(DEMO / f"{name}.jsonl")]
    return list(dict.fromkeys((r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")))


def make_requests(pairs: list[tuple[str, str]], n_requests: int, seed: int) -> list[list[tuple[str, str]]]:
    """`n_requests` requests of 1-32 samples drawn at random (the same list for every system and point)."""
    rng = random.Random(seed)
    return [[rng.choice(pairs) for _ in range(rng.randint(1, 32))] for _ in range(n_requests)]


def summarize(latencies: list[float], samples: int, tokens: int, seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "samples_per_s": round(samples / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "requests": len(latencies),
        "seconds": round(seconds, 2),
        "_latencies": latencies,  # raw, for the CDF plot; not saved
    }


# --- offline references -------------------------------------------------------------------------------


def offline_best(score, sequences: list[list[int]], pad_id: int, batch_sizes=(8, 16, 32, 64)) -> dict:
    """Length-sorted batches at the best batch size: what a server with zero overhead could reach.

    Measured on a seeded sample of 1024 of the load's sequences (same length distribution, a quarter of
    the time)."""
    if len(sequences) > 1024:
        sequences = random.Random(0).sample(sequences, 1024)
    ordered = sorted(sequences, key=len)
    best = {}
    for batch_size in batch_sizes:
        batches = [pad_batch(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
        score(*batches[0])
        started = time.perf_counter()
        for batch in batches:
            score(*batch)
        rate = len(ordered) / (time.perf_counter() - started)
        if rate > best.get("samples_per_s", 0):
            best = {"samples_per_s": round(rate, 1), "batch_size": batch_size}
    best["tokens_per_s"] = round(best["samples_per_s"] * np.mean([len(s) for s in sequences]), 1)
    return best


def torch_scorer(checkpoint: str):
    model, _, _ = load_reward_model(checkpoint)
    model.eval()

    @torch.no_grad()
    def score(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()

    return score


# --- load against servers -------------------------------------------------------------------------------


async def load_grpc(target: str, requests, concurrency: int) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        queue = list(reversed(requests))
        latencies, samples, tokens = [], 0, 0

        async def worker():
            nonlocal samples, tokens
            while queue:
                request = queue.pop()
                message = pb.ScoreRequest(
                    samples=[pb.Sample(text=pb.TextPair(prompt=p, response=r)) for p, r in request]
                )
                started = time.perf_counter()
                response = await stub.Score(message, timeout=300)
                latencies.append(time.perf_counter() - started)
                samples += len(response.results)
                tokens += sum(r.num_tokens for r in response.results)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summarize(latencies, samples, tokens, time.perf_counter() - started)


def load_http(url: str, requests, concurrency: int, tokens_of) -> dict:
    queue = list(reversed(requests))
    latencies, counts = [], {"samples": 0, "tokens": 0}

    def worker():
        while queue:
            try:
                request = queue.pop()
            except IndexError:
                return
            body = json.dumps({"pairs": request}).encode()
            started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=300) as answer:
                rewards = json.loads(answer.read())["rewards"]
            latencies.append(time.perf_counter() - started)
            counts["samples"] += len(rewards)
            counts["tokens"] += sum(tokens_of(p, r) for p, r in request)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return summarize(latencies, counts["samples"], counts["tokens"], time.perf_counter() - started)


def start_process(command: list[str], ready) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}")
        if ready():
            return process
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{command[0]} did not start")


def stop_process(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def http_ready(url: str):
    def ready() -> bool:
        try:
            body = json.dumps({"pairs": [["hi", "hello"]]}).encode()
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5).read()
            return True
        except OSError:
            return False

    return ready


def bench_rm_serve(bundle: str, variant: str, requests, concurrencies, extra: list[str]) -> dict:
    port = free_port()
    target = f"127.0.0.1:{port}"
    command = [
        str(BIN / "rm-serve"),
        "--bundle",
        bundle,
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--variant",
        variant,
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_serving(grpc.insecure_channel(target), process, timeout_s=180)
        asyncio.run(load_grpc(target, requests[:4], 2))  # warm the connection
        return {str(c): asyncio.run(load_grpc(target, requests, c)) for c in concurrencies}
    finally:
        stop_process(process)


def bench_naive(checkpoint: str, requests, concurrencies, tokens_of) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}/score"
    process = start_process(
        [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--model", checkpoint, "--port", str(port)],
        http_ready(url),
    )
    try:
        return {str(c): load_http(url, requests, c, tokens_of) for c in concurrencies}
    finally:
        stop_process(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--checkpoint", default="runs/demo/rm")
    parser.add_argument(
        "--requests", type=int, default=256, help="requests of work per load point (at least 4 per client at c=64)"
    )
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    bundle = load_bundle(args.bundle)
    encoder = bundle.sample_encoder()
    pad_id = bundle.manifest.get("pad_token_id") or 0
    pairs = demo_pairs()
    requests = make_requests(pairs, args.requests, args.seed)
    sequences = [encoder.encode(Sample.from_text(p, r)).ids for request in requests for p, r in request]
    token_cache: dict = {}

    def tokens_of(p: str, r: str) -> int:
        if (p, r) not in token_cache:
            token_cache[(p, r)] = len(encoder.encode(Sample.from_text(p, r)).ids)
        return token_cache[(p, r)]

    results: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}"
    }
    print("offline references ...", flush=True)
    results["offline_ort_fp32"] = offline_best(OnnxEngine(bundle.model_path("fp32")).score, sequences, pad_id)
    if "int8" in bundle.variants:
        results["offline_ort_int8"] = offline_best(OnnxEngine(bundle.model_path("int8")).score, sequences, pad_id)
    results["offline_torch_eager"] = offline_best(torch_scorer(args.checkpoint), sequences, pad_id)
    print("rm-serve fp32 ...", flush=True)
    results["server_fp32"] = bench_rm_serve(args.bundle, "fp32", requests, concurrencies, [])
    if "int8" in bundle.variants:
        print("rm-serve int8 ...", flush=True)
        results["server_int8"] = bench_rm_serve(args.bundle, "int8", requests, concurrencies, [])
    print("naive server ...", flush=True)
    results["naive_server"] = bench_naive(args.checkpoint, requests, concurrencies, tokens_of)

    # single-sample latency overhead at concurrency 1
    engine = OnnxEngine(bundle.model_path("fp32"))
    singles = [pad_batch([s], pad_id) for s in sequences[:64]]
    forward = []
    for batch in singles:
        started = time.perf_counter()
        engine.score(*batch)
        forward.append(time.perf_counter() - started)
    single_requests = [[pairs[i % len(pairs)]] for i in range(64)]
    single = bench_rm_serve(args.bundle, "fp32", single_requests, [1], [])["1"]
    results["single_sample"] = {
        "forward_p50_ms": round(1000 * float(np.median(forward)), 2),
        "server_p50_ms": single["p50_ms"],
    }

    saturation = max(concurrencies)
    fp32 = max(results["server_fp32"][str(c)]["samples_per_s"] for c in concurrencies)
    results["ratios"] = {
        "server_vs_offline_ort": round(fp32 / results["offline_ort_fp32"]["samples_per_s"], 3),
        "server_vs_naive": round(
            results["server_fp32"][str(saturation)]["samples_per_s"]
            / results["naive_server"][str(saturation)]["samples_per_s"],
            3,
        ),
        "p50_overhead_ms": round(
            results["single_sample"]["server_p50_ms"] - results["single_sample"]["forward_p50_ms"], 2
        ),
    }
    if "server_int8" in results:
        int8 = max(results["server_int8"][str(c)]["samples_per_s"] for c in concurrencies)
        results["ratios"]["int8_vs_fp32"] = round(int8 / fp32, 3)
    top = str(saturation)
    latencies = {label: results[key][top]["_latencies"] for key, label in report.SERVERS.items() if key in results}
    for key in ("server_fp32", "server_int8", "naive_server"):
        for point in results.get(key, {}).values():
            point.pop("_latencies", None)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "latest.md").write_text(report.markdown(results))
    pictures = [
        report.throughput_plot(results, args.output / "throughput.png"),
        report.latency_cdf_plot(latencies, args.output / "latency_cdf.png"),
    ]
    print(report.markdown(results))
    print(f"wrote {args.output / 'latest.json'}, latest.md, " + ", ".join(p.name for p in pictures))


if __name__ == "__main__":
    main()
