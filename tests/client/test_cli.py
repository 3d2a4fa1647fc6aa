"""`rm-client` as users run it: a subprocess against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rm_server.launch import free_port, start_server, stop_server
from tests.conftest import sentiment_pairs, write_jsonl

RM_CLIENT = str(Path(sys.executable).parent / "rm-client")


@pytest.fixture(scope="module")
def server(encoder_bundle, tmp_path_factory):
    running = start_server(encoder_bundle, tmp_path_factory.mktemp("cli-server") / "serve.log")
    yield running
    stop_server(running)


def rm_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RM_CLIENT, *args], capture_output=True, text=True, timeout=120)


def test_score_keeps_fields_adds_rewards_and_prints_pairwise_accuracy(server, tmp_path, reference):
    pairs = sentiment_pairs(30, seed=1)
    rows = [{**row, "id": i} for i, row in enumerate(pairs)]
    rows.append({"prompt": "How was the hotel?", "response": "Lovely.", "id": "single"})
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    rows.append({"prompt": "How was the food?", "responses": ["Awful.", "Superb."], "ranking": [1, 0]})
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    result = rm_client(
        "score", "--target", server.target, "--input", str(source), "--output", str(tmp_path / "o.jsonl")
    )
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [o.get("id") for o in out] == [r.get("id") for r in rows]
    for row, scored in zip(pairs, out):
        assert scored["chosen"] == row["chosen"]
        assert scored["reward_chosen"] == pytest.approx(reference(row["prompt"], row["chosen"]), abs=1e-5)
        assert scored["reward_rejected"] == pytest.approx(reference(row["prompt"], row["rejected"]), abs=1e-5)
    assert out[30]["reward"] == pytest.approx(reference("How was the hotel?", "Lovely."), abs=1e-5)
    assert isinstance(out[31]["reward"], float) and len(out[32]["rewards"]) == 2
    accuracy = sum(o["reward_chosen"] > o["reward_rejected"] for o in out[:30]) / 30
    assert f"pairwise accuracy {accuracy:.4f} on 30 pairs" in result.stdout
    assert "scoring" in result.stderr  # the progress bar


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "in.jsonl:2: invalid JSON"),
        ('{"prompt": "p"}', "in.jsonl:2: no field to score"),
        ('{"prompt": "p", "chosen": "a"}', "in.jsonl:2: missing field 'rejected'"),
        ('{"prompt": ["x"], "response": "a"}', "in.jsonl:2: field 'response' is text, so field 'prompt'"),
    ],
)
def test_bad_input_lines_exit_2_naming_file_and_line(server, tmp_path, line, message):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "p", "response": "r"}\n' + line + "\n")
    result = rm_client("score", "--target", server.target, "--input", str(source), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and message in result.stderr


def test_info_health_compare_and_service_errors(server, tmp_path):
    info = rm_client("info", "--target", server.target)
    assert info.returncode == 0 and json.loads(info.stdout)["name"] == "toy"
    health = rm_client("health", "--target", server.target)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    compare = rm_client("compare", "--target", server.target, "--prompt", "How was it?", "--a", "Great.", "--b", "Bad.")
    assert compare.returncode == 0 and 0 < json.loads(compare.stdout)["probability_a_preferred"] < 1
    missing = rm_client("score", "--target", server.target, "--input", str(tmp_path / "nope"), "--output", "o")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    down = rm_client("health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    usage = rm_client("score", "--target", server.target)
    assert usage.returncode == 2 and "--input" in usage.stderr
