"""PPO demo: SmolLM2-135M-Instruct trained by rm-ppo against the served demo reward model, judged by the gold
judge (VADER sentiment, never seen by PPO) on held-out prompts before and after.

    .venv/bin/python bench/ppo_demo.py --bundle runs/demo/bundle --steps 30 --output runs/ppo-demo

Training prompts are the demo data's training prompts; evaluation uses its test prompts (disjoint). `make
demo` runs it with `--steps 2 --eval-prompts 8` to show the loop works; the full run is a benchmark (tens of
minutes on 2 CPU cores) whose numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rm_client import RewardClient
from rm_client.ppo.core import kl_per_token
from rm_client.ppo.main import load_policy
from rm_client.ppo.rollout import Prompt, response_texts, sample, token_logprobs
from rm_server.launch import start_server, stop_server
from rm_training.gold import gold_score

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "rm_training" / "data" / "demo"
BIN = Path(sys.executable).parent


def demo_prompts(split: str) -> list[str]:
    return list(dict.fromkeys(json.loads(line)["prompt"] for line in open(DEMO / f"{split}.jsonl")))


def evaluate(policy, tokenizer, reference, client: RewardClient, prompts: list[str], samples: int, seed: int) -> dict:
    """Mean gold score, reward-model score and KL to the reference of sampled responses (fixed seed)."""
    torch.manual_seed(seed)
    batch = [Prompt(text=p) for p in prompts for _ in range(samples)]
    golds, scores, kls, kls_k3 = [], [], [], []
    for start in range(0, len(batch), 16):
        chunk = batch[start : start + 16]
        rollout = sample(policy, tokenizer, chunk, 48, 0.7, 1.0, tokenizer.eos_token_id, tokenizer.eos_token_id)
        texts = response_texts(tokenizer, rollout)
        golds += [gold_score(t) for t in texts]
        scores += client.score([p.text for p in chunk], texts).tolist()
        with torch.no_grad():
            n = rollout.response_ids.shape[1]
            ref, _ = token_logprobs(reference, rollout.input_ids, rollout.attention_mask, n, 0.7)
        for estimator, values in (("k1", kls), ("k3", kls_k3)):
            values += (kl_per_token(rollout.logprobs, ref, estimator) * rollout.response_mask).sum(1).tolist()
    # k1's mean over a few responses can come out negative; k3 never does (both estimate the same KL)
    return {
        "gold": float(np.mean(golds)),
        "reward": float(np.mean(scores)),
        "kl": float(np.mean(kls)),
        "kl_k3": float(np.mean(kls_k3)),
        "n": len(golds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("runs/ppo-demo"))
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts, 2 samples each")
    parser.add_argument("--results", type=Path, help="also write the numbers and curves here (bench/results)")
    parser.add_argument("ppo_args", nargs="*", help="extra rm-ppo flags after --")
    args = parser.parse_args()

    args.output.mkdir(parents=True, exist_ok=True)
    prompts_file = args.output / "prompts-train.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in demo_prompts("train")))
    held_out = random.Random(0).sample(demo_prompts("test"), args.eval_prompts)
    server = start_server(args.bundle, None, metrics=False, timeout_s=180)
    target = server.target
    try:
        command = [
            str(BIN / "rm-ppo"),
            "--policy",
            "smollm2",
            "--reward-target",
            target,
            "--prompts",
            str(prompts_file),
            "--output",
            str(args.output),
            "--steps",
            str(args.steps),
            *args.ppo_args,
        ]
        subprocess.run(command, check=True)
        initial, tokenizer = load_policy("smollm2")
        trained = AutoModelForCausalLM.from_pretrained(args.output / "policy")
        AutoTokenizer.from_pretrained(args.output / "policy")  # the saved policy loads with transformers alone
        with RewardClient(target) as client:
            before = evaluate(initial, tokenizer, initial, client, held_out, 2, seed=1)
            after = evaluate(trained, tokenizer, initial, client, held_out, 2, seed=1)
    finally:
        stop_server(server)
    rows = [json.loads(line) for line in open(args.output / "metrics.jsonl")]
    wait = sum(r["time/reward_wait"] for r in rows) / sum(r["time/step"] for r in rows)
    summary = {
        "steps": args.steps,
        "held_out_prompts": len(held_out),
        "before": before,
        "after": after,
        "reward_wait_fraction": wait,
        "ppo_flags": args.ppo_args,
    }
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "ppo_demo.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.copy(args.output / "curves.png", args.results / "ppo_curves.png")
    print(json.dumps(summary, indent=2))
    print(
        f"gold (VADER) on {before['n']} held-out responses: {before['gold']:.3f} -> {after['gold']:.3f}; "
        f"reward {before['reward']:.3f} -> {after['reward']:.3f}; KL to reference {after['kl_k3']:.3f} "
        f"(k3, never negative; k1 mean {after['kl']:.3f}); "
        f"reward wait {100 * wait:.1f}% of step time"
    )


if __name__ == "__main__":
    main()
