"""rm-serve on a GPU against what a user gets without it (`make bench-gpu`, on a CUDA host).

    python3 bench/gpu_bench.py prepare --work /tmp/gpubench/work --tokenizer .gpubench/tokenizer
    python3 bench/gpu_bench.py run --work /tmp/gpubench/work --results "$OUT"

`prepare` (on the CPU: PyTorch, and any onnxruntime build for rm-export's checks) builds randomly initialised
Qwen3-shaped reward models (0.6B and 1.7B shapes, saved in bf16 as reward models ship) and exports each to an
fp16 bundle with rm-export, parity-checked there as always. `run` (onnxruntime-gpu: from PyPI, or unpacked
from the offline pack by bench/gpu/device.sh) drives each bundle with the RLHF-shaped workload of
bench/rlhf_bench.py and measures, on the same samples in one run:
- PyTorch bf16 offline: the checkpoint with SDPA attention, length-sorted batches at the best batch size
  (what a user gets without a server);
- ONNX Runtime CUDA offline: the bundle's fp16 graph, length-sorted, best batch size (the serving limit);
- rm-serve (CUDA provider, fp16 variant) under one-request-per-sample load at c=1/16/64/256 and whole-group
  requests at c=8;
- parity on the GPU: served rewards against PyTorch fp32 on the GPU, and batched against alone.
Random weights: speed does not depend on them. Writes gpu.json and gpu.md to --results after each model.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import loadgen
import numpy as np
import servers
import sweeps
import torch
from random_reward_model import SHAPES, save_random_qwen3
from rlhf_bench import rlhf_groups
from serve_bench import demo_pairs
from transformers import AutoConfig, AutoTokenizer

from rm_contract.bundle import load_bundle
from rm_contract.padding import pad_batch
from rm_contract.recipe import Sample

MAX_LENGTH = 1024  # prompts of 30-300 and responses of 20-1000 tokens: the longest are truncated, as in training
CONCURRENCY = (1, 16, 64, 256)
FAILED = "FAILED"  # left by prepare in a model's work directory
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense fp16/bf16 tensor-core peak (NVIDIA's datasheet)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the dry run only


def prepare(args: argparse.Namespace) -> None:
    """Each model's checkpoint and bundle; a model that fails leaves FAILED (so `run` stops waiting for it)
    and the next one is still built."""
    for name in args.models.split(","):
        work = Path(args.work) / name
        if (work / "bundle" / "bundle.json").is_file():
            continue
        work.mkdir(parents=True, exist_ok=True)
        (work / FAILED).unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            save_random_qwen3(work / "checkpoint", SHAPES[name], AutoTokenizer.from_pretrained(args.tokenizer))
            print(f"{name}: checkpoint in {time.perf_counter() - started:.0f} s", flush=True)
            command = [sys.executable, "-m", "rm_training.export", "--model", str(work / "checkpoint")]
            command += ["--output", str(work / "bundle"), "--dtype", "fp32,fp16", "--max-length", str(MAX_LENGTH)]
            subprocess.run(command, check=True)
        except Exception as e:  # noqa: BLE001 - recorded for run, which would otherwise wait for the bundle
            (work / FAILED).write_text(f"{type(e).__name__}: {e}\n")
            print(f"{name}: FAILED: {e}", flush=True)
            continue
        print(f"{name}: bundle in {time.perf_counter() - started:.0f} s", flush=True)


def wait_for_bundle(work: Path, started: float, wait_s: float) -> str | None:
    """None once the bundle is there; else why not (prepare failed, or it is still exporting after wait_s)."""
    while not (work / "bundle" / "bundle.json").is_file():
        if (work / FAILED).is_file():
            return "prepare failed: " + (work / FAILED).read_text().strip()
        if time.monotonic() - started > wait_s:
            return f"no bundle after {wait_s:.0f} s"
        time.sleep(2)  # prepare (in the background) is still exporting it
    return None


def model_flops_per_token(config, mean_tokens: float) -> float:
    """2 x the non-embedding parameters, plus causal attention over the mean length (scores and values)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return 2 * layers * per_layer + 2 * layers * mean_tokens * q


def measured_matmul_tflops() -> float:
    if DEVICE != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12, 1)


def gpu_memory_used_mib() -> int:
    """Memory in use on the whole GPU (all processes), as nvidia-smi reports it; -1 without a driver."""
    if not shutil.which("nvidia-smi"):
        return -1
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    out = subprocess.run(query, text=True, capture_output=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 else -1


def torch_reference(checkpoint: Path, sequences: list[list[int]], parity_set: list[list[int]], pad_id: int) -> dict:
    """PyTorch bf16 offline throughput (SDPA, length-sorted, best batch) and fp32/bf16 rewards on the parity set."""
    from rm_training.model import load_reward_model

    reward_model, _, _ = load_reward_model(checkpoint, max_length=MAX_LENGTH)
    reward_model.model.set_attn_implementation("sdpa")
    reward_model = reward_model.to(DEVICE).eval()

    def score(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids, mask = torch.from_numpy(input_ids).to(DEVICE), torch.from_numpy(attention_mask).to(DEVICE)
            return reward_model(ids, mask).float().cpu().numpy()

    fp32 = np.concatenate([score(*pad_batch(parity_set[i : i + 8], pad_id)) for i in range(0, len(parity_set), 8)])
    reward_model = reward_model.to(torch.bfloat16)
    on_gpu = DEVICE == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    offline = sweeps.offline_best(score, sequences, pad_id, batch_sizes=(16, 32, 64, 128))
    offline["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20) if on_gpu else None
    bf16 = np.concatenate([score(*pad_batch(parity_set[i : i + 8], pad_id)) for i in range(0, len(parity_set), 8)])
    return {"offline": offline, "fp32_rewards": fp32, "bf16_rewards": bf16}


def ort_offline(bundle: Path, sequences: list[list[int]], pad_id: int, provider: str) -> dict:
    from rm_server.runtime.engine import PROVIDERS, open_engine

    engine = open_engine(load_bundle(bundle), "fp16", (provider,))
    if engine.providers[0] != PROVIDERS[provider]:
        raise SystemExit(f"onnxruntime did not start {PROVIDERS[provider]}: {engine.providers}")
    result = sweeps.offline_best(engine.score, sequences, pad_id, batch_sizes=(16, 32, 64, 128))
    del engine
    return result


def served(bundle: Path, per_sample: list, per_group: list, parity_texts: list, provider: str, log: Path) -> dict:
    import grpc

    from rm_contract.pb import reward_pb2 as pb
    from rm_contract.pb import reward_pb2_grpc
    from rm_server.runtime.engine import PROVIDERS

    result: dict = {}
    with servers.rm_serve(str(bundle), "fp16", ["--providers", provider], log=log) as (target, process):
        result["gpu_memory_after_load_mib"] = gpu_memory_used_mib()
        loaded = re.search(r"loaded \S+ version \S+ \((\w+)\)", log.read_text())
        result["provider"] = loaded.group(1) if loaded else None
        if result["provider"] != PROVIDERS[provider]:
            raise SystemExit(f"rm-serve runs on {result['provider']}, not {PROVIDERS[provider]}; see {log}")
        points = loadgen.load_grpc_points(target, per_sample[:128], [1])
        points |= loadgen.load_grpc_points(target, per_sample, list(CONCURRENCY[1:]))
        result["per_sample"] = points
        result["per_group"] = loadgen.load_grpc_points(target, per_group, [max(CONCURRENCY) // 32])
        result["gpu_memory_under_load_mib"] = gpu_memory_used_mib()
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(target))
        samples = [pb.Sample(text=pb.TextPair(prompt=p, response=r)) for p, r in parity_texts]
        batched = [r.reward for r in stub.Score(pb.ScoreRequest(samples=samples), timeout=300).results]
        alone = [stub.Score(pb.ScoreRequest(samples=[s]), timeout=300).results[0].reward for s in samples]
        result["rewards_batched"], result["rewards_alone"] = np.array(batched), np.array(alone)
        result["server_peak_rss_mb"] = servers.peak_rss_mb(process.pid)
    return result


def strip_latencies(points: dict) -> dict:
    return {c: {k: v for k, v in p.items() if not k.startswith("_")} for c, p in points.items()}


def bench_model(name: str, args: argparse.Namespace, peak: float) -> dict:
    work, groups, seed = Path(args.work), args.groups, args.seed
    bundle_dir, checkpoint = work / name / "bundle", work / name / "checkpoint"
    bundle = load_bundle(bundle_dir)
    encoder, pad_id = bundle.sample_encoder(), bundle.manifest.get("pad_token_id") or 0
    count = lambda text: len(encoder.tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    words = [w for p, r in demo_pairs() for w in (p + " " + r).split()]
    text_groups = rlhf_groups(words, groups, count, seed)
    per_sample = [[(p, r)] for p, responses in text_groups for r in responses]
    per_group = [[(p, r) for r in responses] for p, responses in text_groups]
    random.Random(seed).shuffle(per_sample)
    sequences = [encoder.encode(Sample.from_text(p, r)).ids for [(p, r)] in per_sample]
    parity_texts = [pair for [pair] in per_sample[:64]]
    parity_set = sequences[:64]
    mean_tokens = float(np.mean([len(s) for s in sequences]))
    print(f"{name}: {len(sequences)} samples, mean {mean_tokens:.0f} tokens", flush=True)

    print(f"{name}: PyTorch bf16 offline ...", flush=True)
    reference = torch_reference(checkpoint, sequences, parity_set, pad_id)
    gc.collect()  # the PyTorch model goes before ONNX Runtime takes the GPU
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(f"{name}: ONNX Runtime CUDA offline ...", flush=True)
    ort = ort_offline(bundle_dir, sequences, pad_id, args.provider)
    print(f"{name}: rm-serve ...", flush=True)
    log = Path(args.results) / f"rm-serve-{name}.log"
    serve = served(bundle_dir, per_sample, per_group, parity_texts, args.provider, log)

    flops = model_flops_per_token(AutoConfig.from_pretrained(checkpoint), mean_tokens)
    best_served = max(p["tokens_per_s"] for p in serve["per_sample"].values())
    scale = float(np.std(reference["fp32_rewards"])) or 1.0
    fp32 = reference["fp32_rewards"]
    return {
        "samples": len(sequences),
        "mean_tokens": round(mean_tokens, 1),
        "max_length": MAX_LENGTH,
        "export": bundle.manifest.get("exporter"),
        "pytorch_bf16_offline": reference["offline"],
        "ort_cuda_offline": ort,
        "served_per_sample": strip_latencies(serve["per_sample"]),
        "served_per_group": strip_latencies(serve["per_group"]),
        "gpu_memory_mib": {k: serve[k] for k in ("gpu_memory_after_load_mib", "gpu_memory_under_load_mib")},
        "server_peak_rss_mb": serve["server_peak_rss_mb"],
        "server_provider": serve["provider"],
        "flops_per_token": round(flops),
        "served_tflops": round(best_served * flops / 1e12, 1),
        "served_vs_peak": {
            "datasheet": round(best_served * flops / 1e12 / DATASHEET_TFLOPS, 3),
            "measured_matmul": round(best_served * flops / 1e12 / peak, 3),
        },
        "served_vs_pytorch_offline": round(best_served / reference["offline"]["tokens_per_s"], 3),
        "served_vs_ort_offline": round(best_served / ort["tokens_per_s"], 3),
        "parity": {
            "reward_scale_fp32_std": round(scale, 4),
            "served_fp16_vs_torch_fp32_max_abs": float(np.abs(serve["rewards_batched"] - fp32).max()),
            "torch_bf16_vs_torch_fp32_max_abs": float(np.abs(reference["bf16_rewards"] - fp32).max()),
            "served_batched_vs_alone_max_abs": float(np.abs(serve["rewards_batched"] - serve["rewards_alone"]).max()),
        },
    }


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# rm-serve on a GPU ({report['device']})", "", report["note"], ""]
    for name, r in report["models"].items():
        lines += [f"## {name} (fp16 bundle; {r['samples']} samples, mean {r['mean_tokens']} tokens)", ""]
        lines += ["| system | samples/s | tokens/s | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
        for label, key in (("PyTorch bf16 offline", "pytorch_bf16_offline"), ("ORT CUDA offline", "ort_cuda_offline")):
            o = r[key]
            lines.append(f"| {label} (batch {o['batch_size']}) | {o['samples_per_s']} | {o['tokens_per_s']} | | |")
        for mode in ("served_per_sample", "served_per_group"):
            for c, p in r[mode].items():
                unit = "sample" if mode.endswith("sample") else "group"
                lines.append(
                    f"| rm-serve, one {unit} per request, c={c} | {p['samples_per_s']} | {p['tokens_per_s']} "
                    f"| {p['p50_ms']} | {p['p99_ms']} |"
                )
        lines += [
            "",
            f"- rm-serve / PyTorch bf16 offline: **{r['served_vs_pytorch_offline']}x**; "
            f"/ ORT CUDA offline: {r['served_vs_ort_offline']}x",
            f"- achieved {r['served_tflops']} TFLOP/s ({r['served_vs_peak']['datasheet']:.1%} of the "
            f"{DATASHEET_TFLOPS:.0f} datasheet peak, {r['served_vs_peak']['measured_matmul']:.1%} of the "
            f"measured bf16 matmul {report['measured_matmul_tflops']} TFLOP/s)",
            f"- GPU memory: {r['gpu_memory_mib']}",
            f"- parity: {json.dumps(r['parity'])}",
            "",
        ]
    path.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU (dry run)",
        "note": "Random-init Qwen3-shaped reward models (speed does not depend on weights); one run; ratios "
        "are measured in the same run on the same GPU. vLLM's pooling server was not run (it cannot be "
        "carried to the machine); see docs/benchmarks.md.",
        "measured_matmul_tflops": measured_matmul_tflops(),
        "models": {},
    }
    started = time.monotonic()
    for name in args.models.split(","):
        missing = wait_for_bundle(Path(args.work) / name, started, args.wait_for_bundles_s)
        if missing:
            print(f"{name}: skipped, {missing} (see prepare-NAME.log)", flush=True)
            continue
        if time.monotonic() - started > args.time_budget_s:
            print(f"{name}: skipped, the time budget is spent", flush=True)
            continue
        print(f"{name}: bundle ready after {time.monotonic() - started:.0f} s", flush=True)
        report["models"][name] = bench_model(name, args, report["measured_matmul_tflops"])
        (results / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(report, results / "gpu.md")
        print((results / "gpu.md").read_text(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--work", default="/tmp/gpubench/work")
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    parser.add_argument("--tokenizer", default=".gpubench/tokenizer", help="for prepare: the models' tokenizer")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--groups", type=int, default=64, help="GRPO groups (x8 samples) per point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--provider", default="cuda", help="cuda; cpu for the dry run")
    parser.add_argument("--wait-for-bundles-s", type=float, default=0, help="how long run waits for prepare")
    parser.add_argument("--time-budget-s", type=float, default=300, help="no model starts after this")
    args = parser.parse_args()
    prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    main()
