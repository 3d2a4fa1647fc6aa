"""A reward-model checkpoint on a bundled backbone with an untrained head, for throughput and memory benchmarks
(serving speed does not depend on the weights, and it takes seconds instead of a training run).

    .venv/bin/python bench/random_reward_model.py --backbone smollm2 --output runs/bench/smollm2-rm
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from rm_contract.backbones import resolve_backbone
from rm_training.model import load_backbone_model

QWEN3 = dict(  # what Qwen/Qwen3-0.6B's and Qwen/Qwen3-1.7B's config.json share, with a one-output head
    num_key_value_heads=8,
    head_dim=128,
    num_hidden_layers=28,
    num_attention_heads=16,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    num_labels=1,
)
SHAPES = {
    "qwen3-0.6b": QWEN3 | dict(hidden_size=1024, intermediate_size=3072),
    "qwen3-1.7b": QWEN3 | dict(hidden_size=2048, intermediate_size=6144),
    # the dry run of bench/gpu_bench.py on a CPU (make bench-gpu-dry-run)
    "tiny": QWEN3
    | dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}


def save_random_qwen3(path: Path, shape: dict, tokenizer: PreTrainedTokenizerBase) -> None:
    """A randomly initialised Qwen3 sequence-classification model of `shape`, saved in bf16 (as reward models
    ship) with `tokenizer` beside it; seeded, so every run writes the same weights."""
    config = AutoConfig.for_model(
        "qwen3", **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="bundled name (minilm, smollm2) or checkpoint directory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer = load_backbone_model(resolve_backbone(args.backbone))
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote {args.backbone} with an untrained one-output head to {args.output}")


if __name__ == "__main__":
    main()
