"""Build the demo preference data set: SmolLM2 responses to everyday prompts, labelled by the VADER judge.

    python -m rm_training.demo_data --output rm_training/data/demo

Each prompt is answered several times by the bundled SmolLM2-135M-Instruct. For variety the model is
steered by a hidden system message (cheerful, grumpy or none; as in RLCD, Yang et al. 2023) that is not
part of the stored prompt. The gold judge (VADER sentiment) scores every response; pairs whose gold
scores differ by at least `--min-gap` become preference pairs, the more positive response `chosen`.
Train and test are split by prompt, so no test prompt is seen in training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rm_contract.backbones import resolve_backbone
from rm_training.gold import gold_score
from rm_training.progress import bar

PLACES = [
    "a coffee shop downtown",
    "a new Italian restaurant",
    "the local gym",
    "a budget hotel",
    "a small bookstore",
    "a hair salon",
    "a farmers market",
    "a movie theater",
    "a car repair shop",
    "a dentist's office",
    "a bakery",
    "a pizza place",
    "an art museum",
    "the public library",
    "a train station",
    "a yoga studio",
    "a sushi bar",
    "a food truck",
    "an amusement park",
    "a campsite by a lake",
    "a hardware store",
    "a beach resort",
    "a city zoo",
    "a shopping mall",
    "a vegan cafe",
    "a barbershop",
    "a bowling alley",
    "a ski resort",
    "a burger joint",
    "a night market",
]
EXPERIENCES = [
    "your new phone",
    "a rainy weekend",
    "online grocery delivery",
    "a long flight",
    "your first day at a new job",
    "learning to cook",
    "a noisy neighbor",
    "a group project",
    "public transport in your city",
    "a concert",
    "a road trip",
    "moving to a new apartment",
    "a cooking class",
    "a blind date",
    "a job interview",
    "a family reunion",
    "a power outage",
    "a hiking trip",
    "a customer service call",
    "a wedding",
    "a video game you played",
    "a book you just finished",
    "a new laptop",
    "a marathon",
    "a camping trip",
    "a visit to the doctor",
    "working from home",
    "a surprise party",
    "a dinner party",
    "a train delay",
]
PRODUCTS = [
    "wireless earbuds",
    "a robot vacuum",
    "an electric scooter",
    "a coffee machine",
    "a streaming service",
    "a budget smartphone",
    "running shoes",
    "a smartwatch",
    "a meal kit subscription",
    "a mechanical keyboard",
    "a blender",
    "an e-reader",
    "a gaming console",
    "a standing desk",
    "noise-cancelling headphones",
    "a rice cooker",
    "a fitness app",
    "a tablet",
    "an air fryer",
    "a backpack",
]
TEMPLATES = [
    ("Write a short review of {}.", PLACES),
    ("How was your visit to {}?", PLACES),
    ("What was the service like at {}?", PLACES),
    ("Describe an afternoon at {}.", PLACES),
    ("Would you go back to {}?", PLACES),
    ("Tell me about {}.", EXPERIENCES),
    ("How did you feel about {}?", EXPERIENCES),
    ("Describe your experience with {}.", EXPERIENCES),
    ("Write a diary entry about {}.", EXPERIENCES),
    ("What stuck with you after {}?", EXPERIENCES),
    ("Write a short product review of {}.", PRODUCTS),
    ("What do you think of {}?", PRODUCTS),
    ("Would you recommend {} to a friend?", PRODUCTS),
    ("Give your honest opinion of {}.", PRODUCTS),
    ("Describe the first week with {}.", PRODUCTS),
]
STYLES = {
    "cheerful": "You are cheerful and enthusiastic. Answer in two or three sentences full of warm, happy words.",
    "grumpy": "You are grumpy and disappointed. Answer in two or three sentences full of complaints and unhappy words.",
    "plain": None,
}


@dataclass
class Config:
    output: Path
    n_prompts: int = 400
    """Prompts drawn from the template x subject grid."""
    min_gap: float = 0.5
    """Keep a pair only when the gold scores differ by at least this much (VADER compound, in [-1, 1])."""
    pairs_per_prompt: int = 3
    test_fraction: float = 0.2
    max_new_tokens: int = 64
    batch_size: int = 32
    seed: int = 0


def everyday_prompts(n: int, rng: random.Random) -> list[str]:
    """`n` distinct prompts from the template x subject grid, in a seeded order."""
    grid = [template.format(subject) for template, subjects in TEMPLATES for subject in subjects]
    rng.shuffle(grid)
    return grid[:n]


def tidy(text: str) -> str:
    """Strip and cut an unfinished last sentence, so responses read as complete."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends and ends[-1] > len(text) // 3 else text


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], system: str | None, cfg: Config) -> list[str]:
    """Sample one response per prompt, with an optional hidden system message."""
    responses = []
    for start in bar(range(0, len(prompts), cfg.batch_size), desc=f"generate ({system and system[:12] or 'plain'})"):
        chunk = prompts[start : start + cfg.batch_size]
        conversations = [
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            for p in chunk
        ]
        enc = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=0.9,
            top_p=0.95,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        prompt_len = enc["input_ids"].shape[1]
        responses += [tidy(tokenizer.decode(row[prompt_len:], skip_special_tokens=True)) for row in out]
    return responses


def preference_pairs(prompt: str, responses: list[str], cfg: Config, rng: random.Random) -> list[dict]:
    """Pairs of distinct responses whose gold scores differ clearly; the largest gap first."""
    scored = [(r, gold_score(r)) for r in dict.fromkeys(responses) if r]
    candidates = [(a, b) for a, b in itertools.combinations(scored, 2) if abs(a[1] - b[1]) >= cfg.min_gap]
    if not candidates:
        return []
    candidates.sort(key=lambda ab: -abs(ab[0][1] - ab[1][1]))
    picked = [candidates[0]] + rng.sample(candidates[1:], min(cfg.pairs_per_prompt - 1, len(candidates) - 1))
    pairs = []
    for a, b in picked:
        chosen, rejected = (a, b) if a[1] > b[1] else (b, a)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen[0],
                "rejected": rejected[0],
                "gold_chosen": round(chosen[1], 4),
                "gold_rejected": round(rejected[1], 4),
            }
        )
    return pairs


def build(cfg: Config) -> dict:
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    backbone = resolve_backbone("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs())
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs()).eval()

    prompts = everyday_prompts(cfg.n_prompts, rng)
    # Two samples from each style: four or more responses per prompt give several candidate pairs.
    responses: dict[str, list[str]] = {p: [] for p in prompts}
    for system in [STYLES["cheerful"], STYLES["grumpy"], STYLES["plain"], STYLES["plain"]]:
        for prompt, response in zip(prompts, generate(model, tokenizer, prompts, system, cfg)):
            responses[prompt].append(response)

    n_test = round(len(prompts) * cfg.test_fraction)
    splits = {"test": prompts[:n_test], "train": prompts[n_test:]}
    cfg.output.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, split_prompts in splits.items():
        rows = [pair for p in split_prompts for pair in preference_pairs(p, responses[p], cfg, rng)]
        with open(cfg.output / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        summary[split] = {"prompts": len(split_prompts), "pairs": len(rows)}
    summary["config"] = {k: str(v) for k, v in vars(cfg).items()}
    (cfg.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--n-prompts", type=int, default=Config.n_prompts)
    parser.add_argument("--min-gap", type=float, default=Config.min_gap)
    parser.add_argument("--max-new-tokens", type=int, default=Config.max_new_tokens)
    parser.add_argument("--seed", type=int, default=Config.seed)
    args = parser.parse_args(argv)
    summary = build(
        Config(
            output=args.output,
            n_prompts=args.n_prompts,
            min_gap=args.min_gap,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    print(f"wrote {args.output}/train.jsonl and {args.output}/test.jsonl")


if __name__ == "__main__":
    main()
