"""Our reward-model trainer against TRL's RewardTrainer: same data, backbone and budget.

    .venv/bin/python bench/compare_trl.py --output bench/results/trl_comparison.json

Both train the bundled MiniLM backbone for the same epochs, learning rate, batch size, warmup, schedule,
maximum length and seed, with dropout disabled (TRL's default); each is then scored on the held-out split
with its own input formatting (TRL joins prompt and response as one string and appends EOS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from rm_contract.backbones import resolve_backbone
from rm_training.train import TrainConfig, train

DEMO = Path(__file__).resolve().parent.parent / "rm_training" / "data" / "demo"


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_trl(cfg: TrainConfig, output: str) -> dict:
    """TRL's RewardTrainer with the same budget; held-out accuracy computed with TRL's own formatting."""
    backbone = resolve_backbone(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(backbone.path)
    model = AutoModelForSequenceClassification.from_pretrained(backbone.path, num_labels=1)
    keep = ("prompt", "chosen", "rejected")
    train_rows = [{k: r[k] for k in keep} for r in read_pairs(Path(cfg.data))]
    args = RewardConfig(
        output_dir=output,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        max_length=cfg.max_length,
        seed=cfg.seed,
        eos_token=tokenizer.sep_token,  # BERT tokenizers have no EOS; TRL needs one to append
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        bf16=False,
    )
    started = time.time()
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer
    )
    trainer.train()
    seconds = time.time() - started
    model = trainer.model.eval()

    test = read_pairs(Path(cfg.eval_data))

    @torch.no_grad()
    def score(texts: list[str]) -> torch.Tensor:
        rewards = []
        for start in range(0, len(texts), 64):
            enc = tokenizer(
                texts[start : start + 64], padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"
            )
            rewards.append(model(**enc.to(model.device)).logits[:, 0].cpu())
        return torch.cat(rewards)

    eos = tokenizer.sep_token
    chosen = score([r["prompt"] + r["chosen"] + eos for r in test])
    rejected = score([r["prompt"] + r["rejected"] + eos for r in test])
    return {
        "eval_accuracy": (chosen > rejected).float().mean().item(),
        "n_eval_pairs": len(test),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEMO / "train.jsonl"))
    parser.add_argument("--eval-data", default=str(DEMO / "test.jsonl"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    parser.add_argument("--output", type=Path, default=Path("bench/results/trl_comparison.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=args.data, eval_data=args.eval_data, output=f"{tmp}/ours", model=args.model, epochs=args.epochs
        )
        ours = train(cfg)
        trl = train_trl(cfg, f"{tmp}/trl")
    result = {
        "ours": {
            "eval_accuracy": ours["eval_accuracy"],
            "n_eval_pairs": ours["n_eval_pairs"],
            "seconds": ours["seconds"],
        },
        "trl_reward_trainer": trl,
        "accuracy_difference_points": round(100 * (ours["eval_accuracy"] - trl["eval_accuracy"]), 2),
        "budget": {
            k: getattr(cfg, k)
            for k in ("model", "epochs", "lr", "batch_size", "max_length", "warmup_ratio", "lr_scheduler", "seed")
        },
        "data": {"train": os.path.relpath(args.data), "eval": os.path.relpath(args.eval_data)},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
