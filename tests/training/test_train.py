"""rm-train and rm-eval end to end: learning a toy task, the command-line contract, DDP equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rm_training.progress import bar
from tests.conftest import write_jsonl

BIN = Path(sys.executable).parent


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)


def rm_train(data: Path, eval_data: Path, model: str, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(
        str(BIN / "rm-train"),
        "--data",
        str(data),
        "--eval-data",
        str(eval_data),
        "--model",
        model,
        "--output",
        str(output),
        *extra,
    )


def test_tiny_training_measurably_improves_accuracy(toy_data, tiny_encoder_checkpoint, tmp_path):
    train, test = toy_data
    out = tmp_path / "rm"
    result = rm_train(
        train, test, str(tiny_encoder_checkpoint), out, "--epochs", "6", "--lr", "2e-3", "--batch-size", "8"
    )
    assert result.returncode == 0, result.stderr
    # not a terminal: about ten lines of training progress instead of the bar
    steps = [line for line in result.stdout.splitlines() if line.startswith("train step ")]
    assert 8 <= len(steps) <= 12 and "loss" in steps[-1], result.stdout
    report = json.loads((out / "report.json").read_text())
    untrained_accuracy = report["eval_curve"][0][1]
    assert report["eval_accuracy"] >= 0.9
    assert report["eval_accuracy"] >= untrained_accuracy + 0.2
    assert report["loss_curve"][-1][1] < report["loss_curve"][0][1]
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    normalization = json.loads((out / "reward_model.json").read_text())["normalization"]
    assert normalization["size"] > 0 and normalization["std"] > 0

    evaluated = run(str(BIN / "rm-eval"), "--model", str(out), "--data", str(test))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["n_pairs"] == 48
    assert metrics["accuracy"] == pytest.approx(report["eval_accuracy"])


def test_progress_bars_outside_a_terminal_are_plain_lines(capsys):
    """In a log file (stderr not a terminal) a bar prints whole lines, at most every 30 s and at its end,
    instead of carriage-return redraws that pile up into one line."""
    for _ in bar(range(5), desc="work"):
        pass
    lines = capsys.readouterr().err.split("\n")
    assert lines[0].startswith("work:   0%") and lines[-2].startswith("work: 100%") and lines[-1] == ""
    assert not any("\r" in line for line in lines)


def test_decoder_backbone_trains_on_k_way_rankings(tiny_decoder_checkpoint, tmp_path):
    rankings = [
        {"prompt": "How was it?", "responses": ["It was awful.", "It was great!", "It was fine."], "ranking": [1, 2, 0]}
    ] * 12
    data = write_jsonl(tmp_path / "rank.jsonl", rankings)
    out = tmp_path / "rm"
    result = rm_train(
        data, data, str(tiny_decoder_checkpoint), out, "--epochs", "3", "--lr", "3e-3", "--batch-size", "4"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["n_eval_pairs"] == 36  # 12 prompts x C(3, 2)
    assert report["eval_accuracy"] == 1.0
    recipe = json.loads((out / "reward_model.json").read_text())["recipe"]
    assert recipe["template"] == "chat" and "im_start" in recipe["chat_template"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs must be positive"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--model", "/no/such/dir"], "neither a bundled name"),
        (["--max-length", "4096"], "--max-length 4096 exceeds the backbone's 512 position embeddings"),
    ],
)
def test_bad_options_exit_with_code_2_and_one_line(toy_data, tmp_path, args, message):
    train, test = toy_data
    result = rm_train(train, test, "minilm", tmp_path / "out", *args)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]  # earlier lines may be transformers' load report
    assert last_line.startswith("rm-train: error: ") and message in last_line


def test_rm_eval_refuses_a_batch_size_below_one_with_code_2_and_one_line(capsys):
    from rm_training.evaluate import main as rm_eval

    with pytest.raises(SystemExit) as exit_info:
        rm_eval(["--model", "m", "--data", "d.jsonl", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["rm-eval: error: --batch-size must be at least 1"]


def test_bad_data_exits_with_code_2_naming_file_line_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "a"}])
    for command in (
        [str(BIN / "rm-train"), "--data", str(bad), "--eval-data", str(bad), "--output", str(tmp_path / "o")],
        [str(BIN / "rm-eval"), "--model", str(tmp_path), "--data", str(bad)],
    ):
        result = run(*command)
        assert result.returncode == 2
        assert f"{bad}:1: missing field 'rejected'" in result.stderr


def test_ddp_on_two_processes_matches_single_process_training(toy_data, tiny_encoder_checkpoint, tmp_path):
    train, test = toy_data
    common = ["--epochs", "1", "--lr", "1e-3", "--seed", "3"]
    single = rm_train(train, test, str(tiny_encoder_checkpoint), tmp_path / "single", "--batch-size", "8", *common)
    assert single.returncode == 0, single.stderr
    ddp = run(
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "rm_training.train",
        "--data",
        str(train),
        "--eval-data",
        str(test),
        "--model",
        str(tiny_encoder_checkpoint),
        "--output",
        str(tmp_path / "ddp"),
        "--batch-size",
        "4",
        *common,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert ddp.returncode == 0, ddp.stderr
    single_report = json.loads((tmp_path / "single" / "report.json").read_text())
    ddp_report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert ddp_report["world_size"] == 2
    assert ddp_report["steps"] == single_report["steps"] == 12
    assert ddp_report["eval_loss"] == pytest.approx(single_report["eval_loss"], abs=1e-4)
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    ddp_weights = load_file(tmp_path / "ddp" / "model.safetensors")
    worst = max((single_weights[k] - ddp_weights[k]).abs().max().item() for k in single_weights)
    assert worst < 1e-4
