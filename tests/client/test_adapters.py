"""External trainers pointed at a real server: TRL's GRPOTrainer through the reward-function adapter, and
OpenRLHF's remote reward protocol on the server's HTTP port."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer

from rm_client.trl_reward import AsyncServiceReward, ServiceReward
from rm_client.verl_reward import compute_score
from rm_contract.backbones import resolve_backbone
from rm_server.launch import free_port, start_server, stop_server
from tests.conftest import random_texts, served_sha256, tiny_llama_config


@pytest.fixture(scope="module")
def server(encoder_bundle, tmp_path_factory):
    http_port = free_port()
    running = start_server(
        encoder_bundle, tmp_path_factory.mktemp("adapters") / "serve.log", "--http-port", str(http_port)
    )
    running.http_url = f"http://127.0.0.1:{http_port}/get_reward"
    yield running
    stop_server(running)


class RecordingReward(ServiceReward):
    """The adapter, remembering what TRL asked and what it answered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append((list(prompts), list(completions), rewards))
        return rewards


def tiny_policy(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))


def test_trl_grpo_trains_a_step_on_the_services_rewards(server, smollm2_tokenizer, reference, tmp_path):
    reward = RecordingReward(server.target)
    prompts = [f"How was the {thing}?" for thing in ("food", "trip", "hotel", "movie")]
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        generation_kwargs={"min_new_tokens": 2},
        max_steps=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=tiny_policy(smollm2_tokenizer),
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=smollm2_tokenizer,
    )
    trainer.train()
    reward.close()

    assert reward.calls, "TRL never called the reward function"
    scored = [(p, c, r) for ps, cs, rs in reward.calls for p, c, r in zip(ps, cs, rs)]
    for prompt, completion, value in scored:
        assert value == pytest.approx(reference(prompt, completion), abs=1e-5)
    logged = [entry for entry in trainer.state.log_history if "rewards/rewardserve/mean" in entry]
    assert logged, trainer.state.log_history
    assert logged[0]["rewards/rewardserve/mean"] == pytest.approx(sum(r for *_, r in scored) / len(scored), abs=1e-4)


def test_async_reward_function_matches_the_blocking_one(server):
    import asyncio

    prompts, completions = ["How was the food?", "How was the trip?"], ["Lovely.", "Dreadful."]
    blocking = ServiceReward(server.target)
    expected = blocking(prompts, completions)
    blocking.close()
    assert asyncio.run(AsyncServiceReward(server.target)(prompts, completions)) == pytest.approx(expected, abs=1e-6)


def test_reward_functions_raise_by_default_or_return_none_when_asked(server):
    """TRL reads None as "this reward function does not apply" to a completion: with on_failure="none" a
    batch the service cannot score comes back as None for each completion instead of stopping the run."""
    import asyncio

    from rm_client import RetryPolicy, RewardServiceError

    prompts, completions = ["How was the food?", "How was the trip?"], ["Lovely.", "Dreadful."]
    quick = dict(retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02), timeout_s=10)
    down = f"127.0.0.1:{free_port()}"
    with pytest.raises(RewardServiceError):
        ServiceReward(down, **quick)(prompts, completions)
    assert ServiceReward(down, on_failure="none", **quick)(prompts, completions) == [None, None]
    assert asyncio.run(AsyncServiceReward(down, on_failure="none", **quick)(prompts, completions)) == [None, None]
    bad_input = ServiceReward(server.target, on_failure="none")(prompts, [[{"role": "tool", "content": "x"}]] * 2)
    assert bad_input == [None, None]  # a batch refused as invalid: also None (and logged)
    with pytest.raises(ValueError, match="on_failure must be one of raise, none"):
        ServiceReward(server.target, on_failure="zero")


def test_verl_compute_score_called_as_verls_reward_manager_calls_it(server, reference):
    """veRL's naive reward manager (verl/experimental/reward_loop/reward_manager/naive.py, verl 0.9.1) awaits
    `compute_score(data_source=, solution_str=, ground_truth=, extra_info=)` once per sample, many at once,
    adding reward_router_address and reward_model_tokenizer when it runs a reward model of its own; it
    reads result["score"] and logs the other keys. The prompt comes from extra_info (a string, or chat
    messages); a sample without one is refused, never scored as the response alone."""
    texts = random_texts(random.Random(5), 48)

    async def run() -> list[dict]:
        calls = [
            compute_score(
                data_source="openai/gsm8k",
                solution_str=response,
                ground_truth="42",
                extra_info={"split": "train", "index": i, "question": prompt, "num_turns": None},
                target=server.target,
            )
            for i, (prompt, response) in enumerate(texts)
        ]
        as_messages = compute_score(
            data_source="chat",
            solution_str=texts[0][1],
            ground_truth=None,
            extra_info={"prompt": [{"role": "user", "content": texts[0][0]}]},
            reward_router_address=None,
            reward_model_tokenizer=None,
            target=server.target,
        )
        return await asyncio.gather(*calls, as_messages)

    results = asyncio.run(run())
    assert all(set(r) == {"score", "rm_latency_s"} and isinstance(r["score"], float) for r in results)
    expected = [reference(p, r) for p, r in texts]
    np.testing.assert_allclose([r["score"] for r in results], [*expected, expected[0]], atol=1e-5)
    with pytest.raises(ValueError, match=r"no prompt in extra_info under 'prompt' or 'question' \(it has \['index'\]"):
        asyncio.run(compute_score("gsm8k", "42", "42", {"index": 3}, target=server.target))
    for bad in ([{"role": "user"}], [{"role": "user", "content": None}], "", []):
        with pytest.raises(ValueError, match="must be a non-empty string or a list of chat messages"):
            asyncio.run(compute_score("gsm8k", "42", "42", {"prompt": bad}, target=server.target))


VERL_PYTHON = Path(__file__).resolve().parents[2] / ".venv-verl" / "bin" / "python"


@pytest.mark.skipif(not VERL_PYTHON.exists(), reason=".venv-verl missing (make verl-env builds it; make test does)")
def test_verls_own_reward_manager_scores_through_the_documented_config(server, reference):
    """veRL 0.9.1 itself, in its own venv: its loader reads the custom_reward_function config of
    docs/integrations.md, its naive reward manager decodes each rollout and awaits compute_score; the
    rewards it reports are the service's rewards of (prompt, decoded response)."""
    samples = [(p, r) for p, r in random_texts(random.Random(11), 12)]
    command = [str(VERL_PYTHON), str(Path(__file__).with_name("verl_reward_manager.py")), server.target]
    command += [str(resolve_backbone("minilm").path), json.dumps(samples)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["prompt"] for row in rows] == [p for p, _ in samples]
    got = [row["reward_score"] for row in rows]
    np.testing.assert_allclose(got, [reference(row["prompt"], row["decoded"]) for row in rows], atol=1e-5)
    assert all(row["reward_extra_info"]["score"] == row["reward_score"] for row in rows)
    assert all(row["reward_extra_info"]["rm_latency_s"] > 0 for row in rows)


def post(url: str, body: bytes) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def test_openrlhf_remote_reward_protocol(server, reference, encoder_bundle):
    """What OpenRLHF posts (openrlhf/utils/agent.py, one query per call; with several URLs the others get
    empty lists): each query is the prompt followed by the response. The answer names the model."""
    prompts = ["How was the food?", "How was the trip?"]
    responses = [" It was wonderful.", " It was awful."]
    body = {"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts, "labels": ["", ""]}
    status, answer, headers = post(server.http_url, json.dumps(body).encode())
    assert status == 200, answer
    assert answer["rewards"] == answer["scores"]
    for got, prompt, response in zip(answer["rewards"], prompts, responses):
        assert got == pytest.approx(reference(prompt, response), abs=1e-5)
    assert len(answer["extra_logs"]["num_tokens"]) == 2
    sha256 = served_sha256(encoder_bundle)
    assert answer["reward_model"] == {"name": "toy", "version": "1", "sha256": sha256}
    assert headers["X-Reward-Model"] == f"name=toy; version=1; sha256={sha256}"
    status, empty, _ = post(server.http_url, json.dumps({"query": [], "prompts": [], "labels": []}).encode())
    assert status == 200 and empty == {"rewards": [], "scores": [], "extra_logs": {}}


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"not json", 400, "not valid JSON"),
        (b"[1]", 400, "must be a JSON object"),
        (json.dumps({"query": ["ab"]}).encode(), 400, "'prompts' must be a list"),
        (json.dumps({"query": ["ab"], "prompts": ["x"]}).encode(), 400, "query 0 does not start with prompts[0]"),
        (json.dumps({"query": ["ab", "cd"], "prompts": ["a"]}).encode(), 400, "2 queries but 1 prompts"),
        # refused by its count, before any query is looked at
        (json.dumps({"query": ["ab"] * 5000, "prompts": ["a"] * 5000}).encode(), 400, "at most 4096 are accepted"),
    ],
)
def test_openrlhf_protocol_errors_are_clear(server, body, status, message):
    got_status, answer, _ = post(server.http_url, body)
    assert got_status == status and message in answer["error"] and answer["code"] == "INVALID_ARGUMENT"
