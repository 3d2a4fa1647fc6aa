"""Serving benchmark: rm-serve under load against the references, measured in one run (`make bench`).

    .venv/bin/python bench/serve_bench.py --bundle runs/demo/bundle --checkpoint runs/demo/rm \
        --decoder-bundle runs/bench/smollm2-bundle

Load: closed-loop async gRPC clients at several concurrencies, each sending requests of 1-32 samples
drawn from the demo data (its real length distribution), the same 128 requests (about 2100 samples) per
point. References, on the same samples: ONNX Runtime offline (length-sorted, best batch size: the limit
for this engine), PyTorch eager offline (same batching), a naive HTTP + JSON server scoring each request
alone (OpenRLHF-style), and Triton's dynamic batcher through nvidia-pytriton (NeMo-Aligner-style). Then
how cost grows: offline throughput against sequence length, server throughput and memory against
max_batch_tokens, and the SmolLM2 decoder bundle. Ratios are what count: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import grpc
import loadgen
import numpy as np
import onnxruntime
import report
import servers
import sweeps
import torch

from rm_client.samples import text_samples
from rm_contract.bundle import load_bundle
from rm_contract.padding import pad_batch
from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc
from rm_contract.recipe import Sample
from rm_server.runtime.engine import open_engine
from rm_training.model import load_reward_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "rm_training" / "data" / "demo"


def demo_pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for name in ("test", "train") for line in open(DEMO / f"{name}.jsonl")]
    return list(dict.fromkeys((r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")))


def describe_machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GiB, no GPU; Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), torch {torch.__version__}"
    )


def torch_scorer(checkpoint: str):
    model, _, _ = load_reward_model(checkpoint)
    model.eval()

    @torch.no_grad()
    def score(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()

    return score


def drop_latencies(points: dict) -> dict[str, list[float]]:
    """Remove the raw latencies from saved points; return them per concurrency for the CDF plot."""
    return {c: point.pop("_latencies") for c, point in points.items()}


def serve_points(bundle: str, variant: str, requests, concurrencies, extra: list[str] = ()) -> dict:
    with servers.rm_serve(bundle, variant, list(extra)) as (target, _):
        return loadgen.load_grpc_points(target, requests, concurrencies)


def single_sample_overhead(bundle_dir: str, bundle, pairs: list[tuple[str, str]], pad_id: int) -> dict:
    """One sample per request at concurrency 1, from a blocking gRPC stub: server p50 against the bare
    forward pass p50, back to back (the strict reference) and after 2 ms idle (ONNX Runtime's threads then
    need waking, as they do between a lone client's requests)."""
    engine, encoder = open_engine(bundle, "fp32"), bundle.sample_encoder()
    sequences = [encoder.encode(Sample.from_text(p, r)).ids for p, r in pairs]
    back_to_back, after_idle = [], []
    for i in range(200):
        batch = pad_batch([sequences[i % len(pairs)]], pad_id)
        for times, gap in ((back_to_back, 0.0), (after_idle, 0.002)):
            time.sleep(gap)
            started = time.perf_counter()
            engine.score(*batch)
            times.append(time.perf_counter() - started)
    with servers.rm_serve(bundle_dir, "fp32") as (target, _):
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(target))
        requests = [pb.ScoreRequest(samples=text_samples([p], [r])) for p, r in (pairs * 4)[:200]]
        for request in requests[:20]:
            stub.Score(request)
        latencies = []
        for request in requests:
            started = time.perf_counter()
            stub.Score(request)
            latencies.append(time.perf_counter() - started)
    return {
        "forward_p50_ms": round(1000 * float(np.median(back_to_back)), 2),
        "forward_after_idle_p50_ms": round(1000 * float(np.median(after_idle)), 2),
        "server_p50_ms": round(1000 * float(np.median(latencies)), 2),
    }


def decoder_bench(bundle_dir: str, pairs, n_requests: int, concurrency: int, seed: int) -> dict:
    """The SmolLM2 decoder reward model: offline limit and rm-serve, fp32 and int8, one load point."""
    bundle = load_bundle(bundle_dir)
    encoder, pad_id = bundle.sample_encoder(), bundle.manifest.get("pad_token_id") or 0
    requests = loadgen.make_requests(pairs, n_requests, seed)
    sequences = [encoder.encode(Sample.from_text(p, r)).ids for request in requests for p, r in request]
    out: dict = {
        "bundle": bundle.manifest.get("name"),
        "mean_tokens": round(float(np.mean([len(s) for s in sequences])), 1),
    }
    for variant in [v for v in ("fp32", "int8") if v in bundle.variants]:
        print(f"decoder {variant} ...", flush=True)
        out[f"offline_ort_{variant}"] = sweeps.offline_best(
            open_engine(bundle, variant).score, sequences[:128], pad_id, (8, 16)
        )
        point = serve_points(bundle_dir, variant, requests, [concurrency])[str(concurrency)]
        point.pop("_latencies")
        out[f"server_{variant}"] = point
    out["length_sweep_fp32"] = sweeps.length_sweep(
        open_engine(bundle, "fp32").score, [t for s in sequences for t in s], (64, 256, 1024), pad_id, 8192
    )
    out["server_vs_offline_ort"] = round(
        out["server_fp32"]["samples_per_s"] / out["offline_ort_fp32"]["samples_per_s"], 3
    )
    if "server_int8" in out:
        out["int8_vs_fp32"] = round(out["server_int8"]["samples_per_s"] / out["server_fp32"]["samples_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--checkpoint", default="runs/demo/rm")
    parser.add_argument("--decoder-bundle", help="a SmolLM2 reward-model bundle (make bench builds one)")
    parser.add_argument("--requests", type=int, default=128, help="requests of work per load point")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--budgets", default="256,1024,4096,16384", help="max_batch_tokens sweep")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    saturation = str(max(concurrencies))

    bundle = load_bundle(args.bundle)
    encoder, pad_id = bundle.sample_encoder(), bundle.manifest.get("pad_token_id") or 0
    pairs = demo_pairs()
    requests = loadgen.make_requests(pairs, args.requests, args.seed)
    sequences = [encoder.encode(Sample.from_text(p, r)).ids for request in requests for p, r in request]
    token_counts = {pair: len(encoder.encode(Sample.from_text(*pair)).ids) for pair in pairs}

    def tokens_of(pair: tuple[str, str]) -> int:
        return token_counts[pair]

    results: dict = {"machine": describe_machine(), "skipped": {}}
    print("offline references ...", flush=True)
    for variant in [v for v in ("fp32", "int8") if v in bundle.variants]:
        engine = open_engine(bundle, variant)
        results[f"offline_ort_{variant}"] = sweeps.offline_best(engine.score, sequences, pad_id)
    results["offline_torch_eager"] = sweeps.offline_best(torch_scorer(args.checkpoint), sequences, pad_id)
    latencies = {}
    for variant in [v for v in ("fp32", "int8") if v in bundle.variants]:
        print(f"rm-serve {variant} ...", flush=True)
        results[f"server_{variant}"] = serve_points(args.bundle, variant, requests, concurrencies)
    print("naive server ...", flush=True)
    with servers.naive_server(args.checkpoint) as url:
        results["naive_server"] = {
            str(c): loadgen.load_http(url, loadgen.NAIVE, requests, c, tokens_of) for c in concurrencies
        }
    if reason := servers.pytriton_unavailable():
        results["skipped"]["pytriton"] = reason
        print(f"pytriton skipped: {reason}", flush=True)
    else:
        print("pytriton ...", flush=True)
        with servers.pytriton_server(args.bundle, "fp32") as url:
            loadgen.load_http(url, loadgen.TRITON, requests[:4], 2, tokens_of)
            results["pytriton"] = {
                str(c): loadgen.load_http(url, loadgen.TRITON, requests, c, tokens_of) for c in concurrencies
            }
    for key in report.SERVERS:
        if key in results:
            latencies[report.SERVERS[key]] = drop_latencies(results[key])[saturation]
    print("single-sample latency ...", flush=True)
    results["single_sample"] = single_sample_overhead(args.bundle, bundle, pairs[:64], pad_id)
    print("max_batch_tokens sweep ...", flush=True)
    budgets = [b for b in map(int, args.budgets.split(",")) if b >= bundle.recipe.max_length]
    results["budget_sweep"] = sweeps.budget_sweep(args.bundle, requests[:64], budgets, 16)
    print("sequence length sweep ...", flush=True)
    stream = [t for s in sequences for t in s]
    results["length_sweep_fp32"] = sweeps.length_sweep(
        open_engine(bundle, "fp32").score, stream, (64, 128, 256, 512), pad_id
    )
    if args.decoder_bundle:
        results["decoder"] = decoder_bench(args.decoder_bundle, pairs, 24, 16, args.seed)
    else:
        results["skipped"]["decoder"] = "no --decoder-bundle given"
    results["ratios"] = ratios(results, concurrencies)

    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "latest.md").write_text(report.markdown(results))
    pictures = [
        report.throughput_plot(results, args.output / "throughput.png"),
        report.latency_cdf_plot(latencies, args.output / "latency_cdf.png"),
        report.scaling_plot(results, args.output / "scaling.png"),
    ]
    print(report.markdown(results))
    print(f"wrote {args.output / 'latest.json'}, latest.md, " + ", ".join(p.name for p in pictures))


def ratios(results: dict, concurrencies: list[int]) -> dict:
    """The ratios the targets are stated in (docs/benchmarks.md)."""

    def best(key: str, among=concurrencies) -> float:
        return max(results[key][str(c)]["samples_per_s"] for c in among)

    busy = [c for c in concurrencies if c >= 16] or concurrencies
    out = {
        "server_vs_offline_ort": round(best("server_fp32") / results["offline_ort_fp32"]["samples_per_s"], 3),
        "server_vs_naive": round(best("server_fp32", busy) / best("naive_server", busy), 3),
    }
    if "pytriton" in results:
        out["server_vs_pytriton"] = round(best("server_fp32", busy) / best("pytriton", busy), 3)
    if "server_int8" in results:
        out["int8_vs_fp32"] = round(best("server_int8") / best("server_fp32"), 3)
        out["int8_vs_naive"] = round(best("server_int8", busy) / best("naive_server", busy), 3)
    single = results["single_sample"]
    out["p50_overhead_ms"] = round(single["server_p50_ms"] - single["forward_p50_ms"], 2)
    if "decoder" in results:
        out["decoder_server_vs_offline_ort"] = results["decoder"]["server_vs_offline_ort"]
        if "int8_vs_fp32" in results["decoder"]:
            out["decoder_int8_vs_fp32"] = results["decoder"]["int8_vs_fp32"]
    return out


if __name__ == "__main__":
    main()
