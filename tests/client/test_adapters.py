"""External trainers pointed at a real server: TRL's GRPOTrainer through the reward-function adapter, and
OpenRLHF's remote reward protocol on the server's HTTP port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer

from rm_client.trl_reward import AsyncServiceReward, ServiceReward
from tests.conftest import tiny_llama_config
from tests.servers import free_port, start_server, stop_server


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


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_openrlhf_remote_reward_protocol(server, reference):
    """What OpenRLHF's remote_rm_fn posts: each query is the prompt followed by the response."""
    prompts = ["How was the food?", "How was the trip?"]
    responses = [" It was wonderful.", " It was awful."]
    body = {"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts, "labels": ["", ""]}
    status, answer = post(server.http_url, json.dumps(body).encode())
    assert status == 200, answer
    assert answer["rewards"] == answer["scores"]
    for got, prompt, response in zip(answer["rewards"], prompts, responses):
        assert got == pytest.approx(reference(prompt, response), abs=1e-5)
    assert len(answer["extra_logs"]["num_tokens"]) == 2


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"not json", 400, "must be a JSON object"),
        (json.dumps({"query": ["ab"]}).encode(), 400, "'prompts' must be a list"),
        (json.dumps({"query": ["ab"], "prompts": ["x"]}).encode(), 400, "query 0 does not start with prompts[0]"),
        (json.dumps({"query": ["ab", "cd"], "prompts": ["a"]}).encode(), 400, "2 queries but 1 prompts"),
        # refused by its count, before any query is looked at
        (json.dumps({"query": ["ab"] * 5000, "prompts": ["a"] * 5000}).encode(), 400, "at most 4096 are accepted"),
    ],
)
def test_openrlhf_protocol_errors_are_clear(server, body, status, message):
    got_status, answer = post(server.http_url, body)
    assert got_status == status and message in answer["error"] and answer["code"] == "INVALID_ARGUMENT"
