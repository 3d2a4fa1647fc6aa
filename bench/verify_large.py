"""A real-size reward model end to end on this machine (`make verify-large`, not part of `make test`).

    .venv/bin/python bench/verify_large.py --work runs/large --results bench/results

A randomly initialised Qwen3-0.6B-shaped sequence-classification model (fp32 weights over 2 GB) saved as
bf16 safetensors, as reward models ship; exported to fp32 + fp16 (each variant's weights in one .data file),
verified, served by rm-serve and scored through gRPC, batched and alone. Prints and writes the time and peak
resident memory of the export and the server, the export's parity numbers and the served differences.
Random weights: throughput and memory do not depend on them; parity is checked on them like on any model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from random_reward_model import SHAPES, save_random_qwen3
from servers import peak_rss_mb, stop
from transformers import AutoTokenizer

from rm_client.samples import text_samples
from rm_contract.backbones import resolve_backbone
from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc
from rm_server.launch import BIN, start_server

TEXTS = [
    ("How was your weekend?", "Lovely, thanks! We walked by the sea and had dinner with friends."),
    ("Explain photosynthesis briefly.", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Say something rude.", "No."),
    ("Write a haiku about rain.", "Soft rain on the roof / the kettle starts to whistle / the cat stays asleep"),
]


def make_checkpoint(path: Path) -> float:
    """Random Qwen3-0.6B-shaped reward model saved in bf16 (SmolLM2's tokenizer and chat template: the shape
    is what matters here); returns the checkpoint's size in MiB."""
    if not (path / "config.json").is_file():
        backbone = resolve_backbone("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs())
        save_random_qwen3(path, SHAPES["qwen3-0.6b"], tokenizer)
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20


def timed_export(checkpoint: Path, bundle: Path, max_length: int) -> dict:
    """rm-export under /usr/bin/time: wall time and peak RSS as the kernel counts them."""
    command = [str(BIN / "rm-export"), "--model", str(checkpoint), "--output", str(bundle), "--dtype", "fp32,fp16"]
    command += ["--max-length", str(max_length)]
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    print(result.stdout)
    if result.returncode != 0:
        sys.exit(f"rm-export failed ({result.returncode}):\n{result.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_kib / 1024, 1)}


def serve_and_score(bundle: Path, variant: str) -> dict:
    """rm-serve on `bundle` (its log beside it), timed from launch to SERVING, then scoring through gRPC."""
    started = time.perf_counter()
    log = bundle.parent / f"serve-{variant}.log"
    server = start_server(bundle, log, "--variant", variant, metrics=False, timeout_s=900)
    process = server.process
    try:
        channel = server.channel()
        ready_s = time.perf_counter() - started
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        samples = text_samples(*zip(*TEXTS))
        t = time.perf_counter()
        batched = [r.reward for r in stub.Score(pb.ScoreRequest(samples=samples), timeout=600).results]
        batch_s = time.perf_counter() - t
        alone = [stub.Score(pb.ScoreRequest(samples=[s]), timeout=600).results[0].reward for s in samples]
        return {
            "variant": variant,
            "ready_s": round(ready_s, 1),
            "batch_of_4_s": round(batch_s, 2),
            "batched_vs_alone_max_abs_diff": float(np.abs(np.subtract(batched, alone)).max()),
            "server_peak_rss_mb": peak_rss_mb(process.pid),
            "rewards": batched,
        }
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/large", help="where the checkpoint and bundle go")
    parser.add_argument("--results", default="bench/results", help="where verify_large.json goes")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    print("checkpoint: random Qwen3-0.6B-shaped reward model, bf16 ...", flush=True)
    started = time.perf_counter()
    checkpoint_mb = make_checkpoint(work / "checkpoint")
    print(f"  {checkpoint_mb:,.0f} MiB of bf16 safetensors ({time.perf_counter() - started:.0f} s)", flush=True)

    print("rm-export --dtype fp32,fp16 ...", flush=True)
    export = timed_export(work / "checkpoint", work / "bundle", args.max_length)
    manifest = json.loads((work / "bundle" / "bundle.json").read_text())
    print("rm-serve (fp32 variant) and gRPC scoring ...", flush=True)
    served = serve_and_score(work / "bundle", "fp32")

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPUExecutionProvider",
        "model": "Qwen3-0.6B-shaped, random init, bf16 checkpoint",
        "checkpoint_mb": round(checkpoint_mb, 1),
        "bundle_files_mb": {
            name: round((work / "bundle" / name).stat().st_size / 2**20, 1) for name in sorted(manifest["files"])
        },
        "export": export | {"peak_rss_vs_checkpoint": round(export["peak_rss_mb"] / checkpoint_mb, 2)},
        "parity": {
            d: {k: v.get(k) for k in ("verified", "parity_max_abs_diff", "batch_invariance_max_abs_diff", "reason")}
            for d, v in manifest["variants"].items()
        },
        "reward_scale": manifest["parity"]["reward_scale"],
        "served": served,
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "verify_large.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
