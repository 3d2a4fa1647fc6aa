"""Never stall (issue 17): the tight figures that tests only bound with a 10x margin.

    .venv/bin/python bench/stall_bench.py --bundle runs/demo/bundle --results bench/results

1. Probe latency: a health check every 20 ms and a 1-sample Score every 50 ms, on an idle server, then
   while another client sends maximum-size requests (4,096 samples of 2,000 characters, 8 MB each) back
   to back: p50 / p99 / max of each probe.
2. Bulk mix (issue 27): a 1-sample `/classify` every 100 ms on an idle server, then while another client
   sends one `/classify` of 4,096 samples of 300 token ids after another: its p50 / p99 / max against the
   target of 3x its idle p50 plus one batch's engine time (the bulk request's mean batch alone, from the
   server's metrics).
3. Refusal latency: a 10x burst (40 clients, 16-sample requests of 210,000-character texts, against
   `--max-queue 64`): how fast RESOURCE_EXHAUSTED comes back (p50 / p99 / max), and how many were refused.

Writes stall.json and stall.md to --results. The machine is shared and noisy: compare the loaded figures
with the idle ones of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import counters, rm_serve, rm_serve_http

from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc
from rm_server.launch import timed_score


def sample(text: str) -> pb.Sample:
    return pb.Sample(text=pb.TextPair(prompt="Q", response=text))


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {
        "n": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def probe(call: Callable[[], object], every_s: float, stop: threading.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
        time.sleep(every_s)
    return latencies


def probes(target: str, seconds: float, load: Callable[[threading.Event], None] | None) -> dict:
    """Health and 1-sample Score latencies for `seconds`, with `load` running beside them."""
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    scorer = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(target))
    one = pb.ScoreRequest(samples=[sample("A short answer.")])
    health.Check(health_pb2.HealthCheckRequest(), timeout=30)
    scorer.Score(one, timeout=30)
    stop = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        loaders = [pool.submit(load, stop)] if load else []
        check = pool.submit(probe, lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=60), 0.02, stop)
        score = pool.submit(probe, lambda: scorer.Score(one, timeout=60), 0.05, stop)
        time.sleep(seconds)
        stop.set()
        for loader in loaders:
            loader.result()
        return {"health": percentiles(check.result()), "score_1_sample": percentiles(score.result())}


def maximum_size_load(target: str) -> Callable[[threading.Event], None]:
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(target))
    request = pb.ScoreRequest(samples=[sample("lovely day " * 182)] * 4096)  # 2,002 characters each

    def load(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                stub.Score(request, timeout=600)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                time.sleep(0.05)

    return load


def classify(base_url: str, body: bytes, timeout_s: float = 600) -> None:
    request = urllib.request.Request(f"{base_url}/classify", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def batch_seconds(metrics_url: str) -> tuple[float, float]:
    """(engine seconds, batches) run so far, from the server's rm_batch_inference_seconds histogram."""
    names = ("rm_batch_inference_seconds_sum", "rm_batch_inference_seconds_count")
    values = counters(metrics_url, names)
    return values[names[0]], values[names[1]]


def bulk_mix(base_url: str, metrics_url: str, seconds: float) -> dict:
    """A 1-sample /classify every 100 ms, idle and then while 4,096-sample requests of 300 ids are scored."""
    one = json.dumps({"input": "Q: how are you? A: fine, thanks."}).encode()
    rng = np.random.default_rng(0)
    bulk = json.dumps({"input": rng.integers(1000, 20000, (4096, 300)).tolist(), "truncate_prompt_tokens": -1}).encode()
    classify(base_url, one, 30)
    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        idle = pool.submit(probe, lambda: classify(base_url, one, 60), 0.1, stop)
        time.sleep(seconds)
        stop.set()
        idle_ms = percentiles(idle.result())
    stop.clear()

    def load() -> None:  # until the server stops: the request in progress then fails, unread
        try:
            while not stop.is_set():
                classify(base_url, bulk)
        except OSError:
            pass

    threading.Thread(target=load, daemon=True).start()
    time.sleep(2)  # the bulk request is parsed and queued
    before = batch_seconds(metrics_url)
    time.sleep(3)  # the bulk request's batches alone: one batch's time
    engine_s, batches = (a - b for a, b in zip(batch_seconds(metrics_url), before))
    with ThreadPoolExecutor(1) as pool:
        loaded = pool.submit(probe, lambda: classify(base_url, one, 60), 0.1, stop)
        time.sleep(seconds)
        stop.set()
        loaded_ms = percentiles(loaded.result())
    batch_ms = 1000 * engine_s / max(batches, 1)
    target_ms = 3 * idle_ms["p50_ms"] + batch_ms
    return {
        "idle": idle_ms,
        "under_bulk": loaded_ms,
        "mean_batch_ms": batch_ms,
        "target_max_ms": target_ms,
        "meets_target": loaded_ms["max_ms"] <= target_ms,
    }


def burst(target: str) -> dict:
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(target))
    request = pb.ScoreRequest(samples=[sample("lovely wonderful day " * 10_000)] * 16)

    with ThreadPoolExecutor(40) as pool:
        outcomes = list(pool.map(lambda _: timed_score(stub, request, 300), range(40)))
    refused = [s for code, s in outcomes if code == "RESOURCE_EXHAUSTED"]
    return {
        "requests": 40,
        "refused": len(refused),
        "answered": sum(c == "OK" for c, _ in outcomes),
        "refusal": percentiles(refused) if refused else None,
    }


def report(results: dict) -> str:
    lines = [
        f"# Never stall: probe and refusal latency ({results['date']}, {results['machine']})",
        "",
        "| probe | server | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for phase in ("idle", "under_maximum_size_requests"):
        for name, row in results[phase].items():
            lines.append(
                f"| {name} | {phase.replace('_', ' ')} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['max_ms']:.1f} |"
            )
    m = results["bulk_mix"]
    for phase, label in (("idle", "idle"), ("under_bulk", "scoring 4,096 x 300 ids")):
        row = m[phase]
        lines.append(
            f"| 1-sample /classify | {label} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['max_ms']:.1f} |"
        )
    b = results["burst"]
    if b["refusal"]:
        lines.append(
            f"| RESOURCE_EXHAUSTED ({b['refused']} of {b['requests']} refused) | 10x burst | "
            f"{b['refusal']['p50_ms']:.1f} | {b['refusal']['p99_ms']:.1f} | {b['refusal']['max_ms']:.1f} |"
        )
    lines += [
        "",
        f"Under bulk, the 1-sample /classify's worst latency {m['under_bulk']['max_ms']:.0f} ms against a target of "
        f"{m['target_max_ms']:.0f} ms (3x its idle p50 + the mean batch of {m['mean_batch_ms']:.0f} ms): "
        + ("met." if m["meets_target"] else "NOT met."),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each probe phase")
    args = parser.parse_args()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with rm_serve(args.bundle, "fp32") as (target, _):
        print("probes on an idle server ...", flush=True)
        results["idle"] = probes(target, args.seconds, None)
        print("probes while another client sends maximum-size requests ...", flush=True)
        results["under_maximum_size_requests"] = probes(target, args.seconds, maximum_size_load(target))
    with rm_serve_http(args.bundle, "fp32") as (base_url, metrics_url):
        print("a 1-sample /classify every 100 ms, idle and while 4,096 x 300 ids are scored ...", flush=True)
        results["bulk_mix"] = bulk_mix(base_url, metrics_url, args.seconds)
    with rm_serve(args.bundle, "fp32", ["--max-queue", "64", "--tokenizer-processes", "1"]) as (target, _):
        print("10x burst against --max-queue 64 ...", flush=True)
        results["burst"] = burst(target)
    out = Path(args.results)
    (out / "stall.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "stall.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
