"""A reward-model checkpoint on a bundled backbone with an untrained head, for throughput and memory benchmarks
(serving speed does not depend on the weights, and it takes seconds instead of a training run).

    .venv/bin/python bench/random_reward_model.py --backbone smollm2 --output runs/bench/smollm2-rm
"""

from __future__ import annotations

import argparse

import torch

from rm_contract.backbones import resolve_backbone
from rm_training.model import load_backbone_model


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
