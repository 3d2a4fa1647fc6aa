"""rm-ppo end to end: a tiny random policy learns, in a few steps, what a served reward model rewards."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from rm_client import RetryPolicy, RewardClient, RewardServiceError
from rm_client.ppo.config import PPOConfig
from rm_client.ppo.main import load_policy
from rm_client.ppo.rollout import (
    Prompt,
    nucleus,
    prompt_ids,
    response_mask_until_eos,
    response_texts,
    sample,
    sampling_options,
    token_logprobs,
)
from rm_client.ppo.trainer import Batch, PPOTrainer
from rm_contract.padding import pad_batch
from rm_server.launch import start_server, stop_server
from tests.conftest import (
    BAD,
    GOOD,
    THINGS,
    rm_export,
    served_sha256,
    tiny_llama_config,
    train_tiny_encoder,
    write_jsonl,
)

RM_PPO = str(Path(sys.executable).parent / "rm-ppo")


def ppo_flags(**options) -> list[str]:
    """`name=value` options as `--name value` flags."""
    return [part for name, value in options.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def rm_ppo(**options) -> subprocess.CompletedProcess:
    return subprocess.run([RM_PPO, *ppo_flags(**options)], capture_output=True, text=True, timeout=600)


def word_policy(directory: Path) -> Path:
    """A random tiny Llama over a word vocabulary: sentiment words, the toy task's nouns, EOS."""
    vocab = ["<pad>", "<eos>", "how", "was", "the", "it", *THINGS, *GOOD, *BAD]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(vocab), pad_token_id=0, eos_token_id=1)).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def mean_reward(policy_dir: Path, client: RewardClient, prompts: list[Prompt], seed: int) -> float:
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(policy_dir)
    torch.manual_seed(seed)
    rollout = sample(policy, tokenizer, prompts * 8, 4, 1.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = response_texts(tokenizer, rollout)
    return float(np.mean(client.score([p.text for p in prompts * 8], texts)))


def word_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs over the policy's words: the response with a positive word beats the one with a
    negative word, wherever it stands among neutral words (so the reward generalizes to any word order)."""
    rng = random.Random(seed)
    neutral = ["the", "it", "was", *THINGS]
    rows = []
    for _ in range(n):
        words = [rng.choice(neutral) for _ in range(3)]
        at = rng.randint(0, 3)
        chosen, rejected = (" ".join(words[:at] + [rng.choice(side)] + words[at:]) for side in (GOOD, BAD))
        rows.append({"prompt": f"how was the {rng.choice(THINGS)}", "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def word_reward_bundle(tiny_encoder_checkpoint, tmp_path_factory) -> Path:
    """A tiny encoder reward model that rewards positive words anywhere in a response, served as a bundle."""
    tmp = tmp_path_factory.mktemp("word-reward")
    test_file = write_jsonl(tmp / "test.jsonl", word_pairs(64, seed=1))
    checkpoint = train_tiny_encoder(tiny_encoder_checkpoint, word_pairs(256, seed=0), test_file, tmp, 16)
    result = rm_export(
        "--model", str(checkpoint), "--output", str(tmp / "bundle"), "--dtype", "fp32", "--name", "words"
    )
    assert result.returncode == 0, result.stderr
    return tmp / "bundle"


def test_ppo_raises_the_reward_of_a_tiny_policy(word_reward_bundle, tmp_path):
    policy_dir = word_policy(tmp_path / "policy0")
    prompt_texts = [f"how was the {thing}" for thing in THINGS]
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompt_texts])
    server = start_server(word_reward_bundle, tmp_path / "serve.log")
    try:
        result = rm_ppo(
            policy=policy_dir,
            reward_target=server.target,
            prompts=prompts_file,
            output=tmp_path / "run",
            steps=12,
            batch_size=16,
            minibatch_size=8,
            ppo_epochs=2,
            lr=3e-3,
            value_lr=3e-3,
            max_new_tokens=4,
            temperature=1.0,
            beta=0.01,
            kl_estimator="k3",
            save_every=5,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 13))
        assert (tmp_path / "run" / "curves.png").stat().st_size > 0
        prompts = [Prompt(text=t) for t in prompt_texts]
        with RewardClient(server.target) as client:
            before = mean_reward(policy_dir, client, prompts, seed=1)
            after = mean_reward(tmp_path / "run" / "policy", client, prompts, seed=1)
    finally:
        stop_server(server)
    assert after > before + 0.5, (before, after, [r["score"] for r in rows])
    assert all(np.isfinite(r["kl"]) and r["time/reward_wait"] >= 0 for r in rows)
    name = json.loads((word_reward_bundle / "bundle.json").read_text())["name"]
    identity = f"{name} v1 sha256:{served_sha256(word_reward_bundle)}"
    assert {r["reward_model"] for r in rows} == {identity}  # each step logs which reward model scored it


def test_ppo_stops_loudly_when_the_reward_service_is_unreachable(tmp_path):
    from rm_server.launch import free_port

    policy_dir = word_policy(tmp_path / "policy0")
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "how was the food"}])
    result = rm_ppo(
        policy=policy_dir,
        reward_target=f"127.0.0.1:{free_port()}",
        prompts=prompts_file,
        output=tmp_path / "run",
        reward_timeout_s=3,
    )
    assert result.returncode == 1
    assert "reward service failed" in result.stderr and "UNAVAILABLE" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bad_prompts_file_exits_2(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nope": 1}\n')
    result = rm_ppo(policy=word_policy(tmp_path / "p"), reward_target="127.0.0.1:1", prompts=bad, output=tmp_path / "r")
    assert result.returncode == 2 and "prompts.jsonl:2" in result.stderr


def test_a_resumed_run_takes_the_very_step_an_uninterrupted_one_takes(word_reward_bundle, tmp_path):
    """Resuming restores the policy, value model, optimizers, KL coefficient and every RNG: step 3 of a run
    stopped after step 2 and resumed equals step 3 of a run never stopped, bit for bit (its metrics and the
    final weights)."""
    policy_dir = word_policy(tmp_path / "policy0")
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"how was the {t}"} for t in THINGS])
    server = start_server(word_reward_bundle, tmp_path / "serve.log")
    common = {"policy": policy_dir, "reward_target": server.target, "prompts": prompts_file}
    common |= {"batch_size": 4, "minibatch_size": 2, "max_new_tokens": 3, "save_every": 1, "target_kl": 0.01}
    try:
        whole = rm_ppo(steps=3, output=tmp_path / "whole", **common)
        assert whole.returncode == 0, whole.stderr[-2000:]
        first = rm_ppo(steps=2, output=tmp_path / "run", **common)
        assert first.returncode == 0, first.stderr[-2000:]
        state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
        assert state["step"] == 2
        resumed = subprocess.run(
            [RM_PPO, *ppo_flags(steps=3, output=tmp_path / "run", **common), "--resume"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        stop_server(server)
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    timeless = lambda row: {k: v for k, v in row.items() if not k.startswith("time/") and "wait" not in k}  # noqa: E731
    assert timeless(rows[2]) == timeless(reference[2])
    resumed_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy").state_dict()
    whole_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "policy").state_dict()
    assert all(torch.equal(resumed_policy[k], whole_policy[k]) for k in whole_policy)


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_the_first_update_sees_a_ratio_of_one_with_dropout_in_the_checkpoint(tmp_path, top_p):
    """Dropout is off in both the sampling and the update pass, as TRL does, so a checkpoint with dropout
    sees a ratio of 1 (approx KL 0, no clipping) before any update; and pad id 0 is a pad id, not a missing
    one. With top-p, the update's log-probs are the nucleus's, as the rollout's are."""
    policy_dir = word_policy(tmp_path / "policy")
    policy, tokenizer = load_policy(str(policy_dir))
    assert policy.generation_config.pad_token_id == 0  # not taken for missing (`pad or eos` would give the eos id, 1)
    policy.config.attention_dropout = 0.5
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.5
    config = PPOConfig(policy=str(policy_dir), reward_target="", prompts="", output=str(tmp_path / "out"))
    config.batch_size = config.minibatch_size = 8
    config.ppo_epochs, config.top_p = 1, top_p
    prompts = [Prompt(text="how was the trip")] * 8
    trainer = PPOTrainer(config, policy, tokenizer, None, prompts)
    torch.manual_seed(0)
    rollout = sample(policy.eval(), tokenizer, prompts, 8, config.temperature, top_p, trainer.eos_id, trainer.pad_id)
    zeros = torch.zeros_like(rollout.logprobs)
    stats = trainer._optimize(Batch(rollout, rollout.logprobs, zeros, zeros, zeros))
    assert stats["approx_kl"] < 1e-5 and stats["policy_clip_fraction"] == 0.0, stats


def test_top_p_log_probs_are_those_of_the_distribution_sampled(tmp_path):
    """Log-probs (the rollout's, the update's, the KL's policy side) are those of the renormalized top-p
    nucleus that `generate` samples from, not the full distribution's: the log-softmax of the very scores
    generate sampled with. A token an update moves out of the nucleus keeps a finite log-prob, and gradients
    stay finite."""
    policy, tokenizer = load_policy(str(word_policy(tmp_path / "policy")))
    policy.eval()
    pad, eos, temperature, top_p = tokenizer.pad_token_id, tokenizer.eos_token_id, 0.7, 0.5
    queries = [prompt_ids(tokenizer, Prompt(text=t)) for t in ("how was the trip", "how was it", "the")]
    query_ids, query_mask = map(torch.from_numpy, pad_batch(queries, pad, "left"))
    torch.manual_seed(0)
    out = policy.generate(  # as `sample` calls it, keeping the scores each token was drawn from
        input_ids=query_ids,
        attention_mask=query_mask,
        **sampling_options(temperature, top_p, 12, eos, pad),
        output_scores=True,
        return_dict_in_generate=True,
    )
    response = out.sequences[:, query_ids.shape[1] :]
    mask, _ = response_mask_until_eos(response, eos)
    real = mask.bool()
    sampled_from = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    expected = sampled_from.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    ids, attention = out.sequences, torch.cat([query_mask, mask], 1)
    with torch.no_grad():
        ours, _ = token_logprobs(policy, ids, attention, response.shape[1], temperature, top_p)
        full, _ = token_logprobs(policy, ids, attention, response.shape[1], temperature)
    assert real.sum() >= 12
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=0)
    assert (ours - full)[real].min() > 0.05  # the nucleus's mass is < 1: the full distribution is another one
    scores = torch.randn(3, 7, 50)
    assert torch.equal(nucleus(scores, 0.5, max_elements=50), nucleus(scores, 0.5))  # a row at a time, or all

    moved = ids.clone()  # the first response token replaced by the least likely one: out of any nucleus
    moved[:, query_ids.shape[1]] = sampled_from[:, 0].argmin(-1)
    logp, entropy = token_logprobs(policy, moved, attention, response.shape[1], temperature, top_p, with_entropy=True)
    (logp[real].sum() + entropy[real].sum()).backward()
    assert logp.isfinite().all() and entropy.isfinite().all()
    assert all(p.grad is None or p.grad.isfinite().all() for p in policy.parameters())


class TimedClient(RewardClient):
    """The real client, slowed by 0.3 s, recording when each scoring call starts and ends."""

    calls: list[tuple[float, float]] = []

    def score_completions(self, *args, **kwargs):
        started = time.perf_counter()
        time.sleep(0.3)
        try:
            return super().score_completions(*args, **kwargs)
        finally:
            self.calls.append((started, time.perf_counter()))


def test_the_reward_call_is_in_flight_during_the_reference_and_value_pass_and_a_failure_trains_nothing(
    word_reward_bundle, tmp_path
):
    """The step sends the rollout for scoring, then runs the frozen reference and the value model while the
    service works: a slow service costs no time the local pass takes. When the service fails mid-run, the
    step raises before any update: no step ever trains on missing rewards. With top-p the reference samples
    the same way, so the first step's KL (policy == reference) is 0."""
    policy_dir = word_policy(tmp_path / "policy")
    policy, tokenizer = load_policy(str(policy_dir))
    config = PPOConfig(policy=str(policy_dir), reward_target="", prompts="", output=str(tmp_path / "out"))
    config.batch_size = config.minibatch_size = 4
    config.max_new_tokens, config.top_p = 3, 0.5
    server = start_server(word_reward_bundle, tmp_path / "serve.log")
    client = TimedClient(server.target, timeout_s=5, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    reference_pass: list[tuple[float, float]] = []
    try:
        trainer = PPOTrainer(config, policy, tokenizer, client, [Prompt(text="how was the trip")])
        trainer.reference.register_forward_pre_hook(lambda *_: reference_pass.append((time.perf_counter(), 0.0)))
        trainer.reference.register_forward_hook(
            lambda *_: reference_pass.append((reference_pass.pop()[0], time.perf_counter()))
        )
        first = trainer.step()
        assert abs(first["kl"]) < 1e-6  # policy == reference, both sampling the top-p nucleus: KL 0
        (reward_started, reward_ended), (local_started, local_ended) = client.calls[0], reference_pass[0]
        assert reward_started < local_started and local_ended < reward_ended  # the pass ran inside the call
        stop_server(server)
        weights = {k: v.clone() for k, v in policy.state_dict().items()}
        with pytest.raises(RewardServiceError) as error:
            trainer.step()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        assert all(torch.equal(policy.state_dict()[k], w) for k, w in weights.items())  # nothing trained
        assert trainer.step_index == 1
    finally:
        client.close()
        stop_server(server)
