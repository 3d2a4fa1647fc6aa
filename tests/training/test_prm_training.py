"""Process reward models in rm-train and rm-eval: labels on the encoder's step tokens, a loss that reads
nothing else, the held-out step metrics, the data checks, and the demo data's gold labels."""

from __future__ import annotations

import ast
import itertools
import json
import operator
import random
from pathlib import Path

import numpy as np
import pytest

from rm_contract.recipe import Sample
from rm_contract.records import DataError, StepSolution, load_groups, load_step_solutions
from rm_training import demo_prm
from rm_training.evaluate import main as rm_eval
from rm_training.model import load_reward_model, sample_encoder
from rm_training.prm_data import collate_steps, tokenize_solutions
from rm_training.prm_metrics import IGNORE_INDEX, auroc, first_error_accuracy, step_accuracy, step_loss, step_metrics
from rm_training.prm_train import StepLogits
from rm_training.step_model import new_step_model
from rm_training.train import TrainConfig, train
from rm_training.train import main as rm_train
from tests.conftest import GOOD, THINGS, save_tiny_token_classifier, write_jsonl

BAD_WORDS = ["awful", "terrible", "horrible", "dreadful"]


@pytest.fixture(scope="module")
def tiny_prm(request, tmp_path_factory) -> Path:
    """A 2-layer random token classifier (2 labels, as TRL's) with a real tokenizer, saved as a checkpoint."""
    kind = request.param
    path = tmp_path_factory.mktemp(f"tiny-prm-{kind}")
    tokenizer = request.getfixturevalue("smollm2_tokenizer" if kind == "decoder" else "minilm_tokenizer")
    return save_tiny_token_classifier(path, kind, tokenizer)


both_kinds = pytest.mark.parametrize("tiny_prm", ["encoder", "decoder"], indirect=True)


def review_rows(n: int, seed: int) -> list[dict]:
    """A learnable toy: each step names a good or a bad word, and is correct iff its word is good."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [rng.random() < 0.6 for _ in range(rng.randint(1, 3))]
        steps = [f"The {rng.choice(THINGS)} was {rng.choice(GOOD if ok else BAD_WORDS)}." for ok in labels]
        rows.append({"prompt": "Review the evening.", "completions": steps, "labels": labels})
    return rows


def solutions(rows: list[dict]) -> list[StepSolution]:
    return [StepSolution(r["prompt"], tuple(r["completions"]), tuple(r["labels"])) for r in rows]


@both_kinds
def test_labels_sit_on_the_step_tokens_the_server_scores(tiny_prm):
    _, tokenizer, metadata = new_step_model(str(tiny_prm), 64)
    encoder = sample_encoder(tokenizer, metadata.recipe)
    rows = solutions(review_rows(6, seed=0))
    tokenized, refused = tokenize_solutions(rows, encoder)
    assert not refused
    batch = collate_steps(tokenized, tokenizer.pad_token_id)
    last_only = collate_steps(tokenized, tokenizer.pad_token_id, last_step_only=True)
    for row, solution in enumerate(rows):
        expected = encoder.encode(Sample.from_steps(solution.prompt, solution.steps)).steps  # what the server reads
        labelled = (batch.targets[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(expected)
        assert batch.targets[row, labelled].tolist() == [int(label) for label in solution.labels]
        assert set(batch.input_ids[row, labelled].tolist()) == {encoder.step_id}
        assert (last_only.targets[row] != IGNORE_INDEX).nonzero().flatten().tolist() == [expected[-1]]
        assert last_only.targets[row, expected[-1]].item() == int(solution.labels[-1])


@both_kinds
def test_the_loss_reads_the_logits_at_step_tokens_and_nowhere_else(tiny_prm):
    model, tokenizer, metadata = new_step_model(str(tiny_prm), 64)
    tokenized, _ = tokenize_solutions(solutions(review_rows(6, seed=1)), sample_encoder(tokenizer, metadata.recipe))
    batch = collate_steps(tokenized, tokenizer.pad_token_id)
    logits = StepLogits(model)(batch.input_ids, batch.attention_mask).detach().requires_grad_()  # (B, T, 2)
    step_loss(logits, batch.targets).backward()
    touched = {tuple(p) for p in (logits.grad.abs().sum(-1) > 0).nonzero().tolist()}
    assert touched == {(row, t) for row, s in enumerate(tokenized) for t in s.steps}
    # by hand: the mean over steps of -log softmax at the label
    log_probs = logits.detach().log_softmax(-1)
    by_hand = -np.mean(
        [log_probs[r, t, int(y)].item() for r, s in enumerate(tokenized) for t, y in zip(s.steps, s.labels)]
    )
    assert step_loss(logits.detach(), batch.targets).item() == pytest.approx(by_hand, rel=1e-5)


def prm_config(tmp_path: Path, checkpoint: Path, rows: list[dict], eval_rows: list[dict], **options) -> TrainConfig:
    tmp_path.mkdir(exist_ok=True)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    options = {"epochs": 6, "lr": 3e-3, "batch_size": 8, "max_length": 64, **options}
    return TrainConfig(str(train_file), str(eval_file), str(tmp_path / "rm"), str(checkpoint), **options)


@pytest.mark.parametrize("tiny_prm", ["encoder"], indirect=True)
def test_tiny_encoder_learns_step_labels_and_rm_eval_agrees(tiny_prm, tmp_path, capsys):
    refused = {"prompt": "Review it.", "completions": ["Two steps [SEP] in one.", "Fine."], "labels": [True, True]}
    cfg = prm_config(tmp_path, tiny_prm, review_rows(64, seed=2) + [refused], review_rows(32, seed=3))
    report = train(cfg)
    assert "skipped 1 of 65 train rows the input recipe refuses" in capsys.readouterr().out
    assert report["n_skipped_train"] == 1 and report["n_train_solutions"] == 64
    assert report["n_solutions"] == 32 and report["n_steps"] == sum(len(r["labels"]) for r in review_rows(32, 3))
    assert report["loss_curve"][-1][1] < report["loss_curve"][0][1]
    assert report["step_accuracy"] >= report["majority_step_accuracy"] + 0.1
    assert report["step_auroc"] > report["eval_curve"][0]["step_auroc"]
    out = Path(cfg.output)
    assert (out / "curves.png").stat().st_size > 0
    model, _, metadata = load_reward_model(out)
    assert metadata.output_kind == "steps" and metadata.recipe.step_token == "[SEP]"

    rm_eval(["--model", str(out), "--data", cfg.eval_data])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("step_accuracy", "first_error_accuracy", "step_auroc", "n_steps", "n_solutions"):
        assert metrics[name] == pytest.approx(report[name], abs=1e-6), name


@pytest.mark.parametrize("tiny_prm", ["decoder"], indirect=True)
def test_last_step_only_ignores_every_earlier_label(tiny_prm, tmp_path):
    """Training rows that differ only in labels before the last step train the same model with the flag,
    and different ones without it."""
    rows = [r for r in review_rows(24, seed=4) if len(r["labels"]) > 1][:16]
    flipped = [{**r, "labels": [not y for y in r["labels"][:-1]] + r["labels"][-1:]} for r in rows]
    curves = {}
    for last_only in (True, False):
        for name, data in (("rows", rows), ("flipped", flipped)):
            options = {"epochs": 1, "batch_size": 4, "train_on_last_step_only": last_only}
            curves[name, last_only] = train(
                prm_config(tmp_path / f"{name}-{last_only}", tiny_prm, data, rows, **options)
            )["loss_curve"]
    assert curves["rows", True] == curves["flipped", True]
    assert curves["rows", False] != curves["flipped", False]
    recipe = json.loads((tmp_path / "rows-True" / "rm" / "reward_model.json").read_text())["recipe"]
    assert recipe["step_token"] == "\n"


def test_step_accuracy_counts_half_as_correct():
    probs, labels = np.array([0.9, 0.4, 0.5, 0.1]), np.array([True, True, False, False])
    assert step_accuracy(probs, labels) == 0.5  # 0.5 is predicted correct


def test_first_error_accuracy_asks_for_the_exact_first_wrong_step():
    cases = [
        ([0.9, 0.2, 0.1], [True, False, False]),  # found: step 1
        ([0.9, 0.3, 0.2], [True, True, False]),  # flagged step 1, too early
        ([0.8, 0.9], [False, False]),  # never flagged
        ([0.1, 0.1], [True, True]),  # no wrong step: not counted
        ([0.6, 0.4], [True, False]),  # found: step 1
    ]
    probs, labels = zip(*[(np.array(p), np.array(y)) for p, y in cases])
    assert first_error_accuracy(probs, labels) == 0.5
    assert first_error_accuracy(probs[3:4], labels[3:4]) is None


def test_auroc_is_the_pairwise_count_with_ties_half():
    assert auroc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False])) == 0.75
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200) / 5  # many ties
    positive = rng.random(200) < 0.3
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(scores[positive], scores[~positive])]
    assert auroc(scores, positive) == pytest.approx(np.mean(pairs))
    assert auroc(scores, np.ones(200, dtype=bool)) is None


def test_step_metrics_count_steps_solutions_and_the_majority_label():
    metrics = step_metrics([np.array([0.9, 0.2]), np.array([0.7])], [np.array([True, False]), np.array([True])])
    assert metrics["n_steps"] == 3 and metrics["n_solutions"] == 2 and metrics["n_solutions_with_error"] == 1
    assert metrics["step_accuracy"] == 1.0 and metrics["majority_step_accuracy"] == pytest.approx(2 / 3)
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.7])), rel=1e-6)


ROW = {"prompt": "Compute 2 + 3.", "completions": ["2 + 3 = 5", "The answer is 5."], "labels": [True, True]}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**ROW, "labels": [True]}, "1 labels for 2 steps in 'completions'"),
        ({**ROW, "completions": [], "labels": []}, "field 'completions' is empty"),
        ({**ROW, "labels": [1, 1]}, "field 'labels[0]' is 1; a step's label is true or false"),
        ({**ROW, "labels": [True, "yes"]}, "field 'labels[1]' is 'yes'"),
        ({**ROW, "completions": "2 + 3 = 5"}, "field 'completions' must be a list of steps"),
        ({"completions": ["a"], "labels": [True]}, "missing field 'prompt'"),
        ({**ROW, "chosen": "5"}, "field 'chosen' in a process-reward row"),
    ],
)
def test_bad_process_reward_rows_are_refused_naming_line_and_field(tmp_path, row, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [ROW, row])
    with pytest.raises(DataError, match="bad.jsonl:2: ") as error:
        load_step_solutions(data)
    assert message in str(error.value)


def test_a_file_mixing_process_reward_rows_and_preferences_is_refused(tmp_path):
    pair = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    steps_first = write_jsonl(tmp_path / "steps_first.jsonl", [ROW, pair])
    pairs_first = write_jsonl(tmp_path / "pairs_first.jsonl", [pair, ROW])
    with pytest.raises(DataError, match=r"steps_first.jsonl:2: a preference or scoring record among process-reward"):
        load_step_solutions(steps_first)
    with pytest.raises(DataError, match=r"pairs_first.jsonl:2: a process-reward row .* among preference"):
        load_groups(pairs_first)


@pytest.mark.parametrize("first", ["steps", "pairs"])
def test_rm_train_exits_with_code_2_on_a_mixed_file(tmp_path, capsys, first):
    pair = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    data = write_jsonl(tmp_path / "mixed.jsonl", [ROW, pair] if first == "steps" else [pair, ROW])
    with pytest.raises(SystemExit) as exit_info:
        rm_train(["--data", str(data), "--eval-data", str(data), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"rm-train: error: {data}:2: ") and "a file holds one kind of record" in last


def test_rm_train_refuses_preference_eval_data_for_process_reward_training(tmp_path, capsys):
    data = write_jsonl(tmp_path / "steps.jsonl", [ROW])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(SystemExit):
        rm_train(["--data", str(data), "--eval-data", str(pairs), "--output", str(tmp_path / "out")])
    assert "--data holds process-reward rows but --eval-data" in capsys.readouterr().err


def true_values(prompt: str) -> list[int]:
    """The value of every operation of the prompt's expression, innermost first, recomputed from its text."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
    values = []

    def value(node: ast.expr) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        assert isinstance(node, ast.BinOp)
        result = ops[type(node.op)](value(node.left), value(node.right))
        values.append(result)
        return result

    value(ast.parse(prompt.removeprefix("Compute ").removesuffix("."), mode="eval").body)
    return values


def test_demo_data_gold_labels_are_the_recomputed_arithmetic(tmp_path):
    demo_prm.main(["--output", str(tmp_path), "--train", "400", "--test", "100", "--seed", "5"])
    train_rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test_rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(train_rows) == 400 and len(test_rows) == 100
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in test_rows}
    with_error = 0
    for row in train_rows + test_rows:
        truth = true_values(row["prompt"])
        *operations, answer = row["completions"]
        assert len(operations) == len(truth) and answer.startswith("The answer is ")
        stated = [int(step.split(" = ")[1]) for step in operations] + [int(answer.split()[-1].rstrip("."))]
        right = [s == t for s, t in zip(stated, truth + truth[-1:])]
        assert row["labels"] == list(itertools.accumulate(right, operator.and_)), row  # Math-Shepherd's labels
        with_error += not all(row["labels"])
    assert 0.4 < with_error / 500 < 0.6  # --error-rate 0.5


def test_committed_demo_data_is_what_the_generator_writes(tmp_path):
    demo_prm.main(["--output", str(tmp_path)])
    committed = Path(__file__).parents[2] / "rm_training" / "data" / "demo_prm"
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_text() == (committed / name).read_text()
        assert (committed / name).stat().st_size < 1_000_000
