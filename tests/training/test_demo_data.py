"""The demo preference data: its builder's pure parts, and the quality of the committed files."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rm_contract.records import load_groups
from rm_training.demo_data import Config, everyday_prompts, preference_pairs, tidy
from rm_training.gold import gold_score

DEMO = Path(__file__).resolve().parents[2] / "rm_training" / "data" / "demo"


def test_gold_judge_prefers_positive_text():
    assert gold_score("What a wonderful, lovely day!") > 0.5 > -0.5 > gold_score("This was awful and I hate it.")


def test_prompts_are_seeded_and_distinct():
    first = everyday_prompts(50, random.Random(0))
    assert first == everyday_prompts(50, random.Random(0))
    assert len(set(first)) == 50


def test_tidy_cuts_an_unfinished_last_sentence():
    assert tidy("  It was great and the staff were friendly. The") == "It was great and the staff were friendly."
    assert tidy("No sentence end here") == "No sentence end here"


def test_pairs_keep_only_clear_gold_gaps_with_the_more_positive_response_chosen():
    responses = ["I love it, wonderful!", "It is a phone.", "Terrible, I hate it.", "It is a phone."]
    pairs = preference_pairs("Q", responses, Config(output=Path("."), pairs_per_prompt=3), random.Random(0))
    assert pairs[0]["chosen"] == "I love it, wonderful!" and pairs[0]["rejected"] == "Terrible, I hate it."
    for pair in pairs:
        assert pair["gold_chosen"] - pair["gold_rejected"] >= 0.5


def test_committed_demo_data_is_valid_clear_and_split_by_prompt():
    splits = {name: [json.loads(line) for line in open(DEMO / f"{name}.jsonl")] for name in ("train", "test")}
    assert len(splits["train"]) >= 500 and len(splits["test"]) >= 100
    for rows in splits.values():
        assert all(row["gold_chosen"] - row["gold_rejected"] >= 0.5 for row in rows)
        assert all(abs(gold_score(row["chosen"]) - row["gold_chosen"]) < 1e-3 for row in rows[:20])
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}
    assert len(load_groups(DEMO / "test.jsonl")) == len(splits["test"])
