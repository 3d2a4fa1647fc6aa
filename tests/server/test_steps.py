"""Process reward models served end to end: TRL-shaped token-classification checkpoints (a tiny random Llama
with SmolLM2's tokenizer, step token "\\n"; a tiny random BERT with MiniLM's, step token [SEP]) exported by
rm-export and served by rm-serve; every step's score against PyTorch, batched against alone."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from rm_client.client import RewardClient
from rm_client.ppo import core
from rm_client.ppo.config import PPOConfig
from rm_client.ppo.rollout import Prompt, Rollout
from rm_client.ppo.steps import split_steps
from rm_client.ppo.trainer import PPOTrainer
from rm_client.verl_reward import compute_score
from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import Sample
from rm_server.launch import free_port, start_server, stop_server
from rm_training.model import load_reward_model, sample_encoder
from tests.conftest import rm_export, save_tiny_token_classifier, tiny_llama_config
from tests.contract.test_bundle_integrity import edit_manifest

PROMPT = "Compute ((12 + 7) * 3) - 5, showing each step of the arithmetic on its own line."
SOLUTIONS = [
    ["12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 52", "The answer is 52."],
    ["12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 51", "The answer is 51."],
    ["12 + 7 = 20", "20 * 3 = 60", "60 - 5 = 55", "The answer is 55."],
    ["12 + 7 = 19", "19 * 3 = 58"],
    ["The answer is 52."],
]


@pytest.fixture(scope="module", params=["decoder", "encoder"])
def prm(request, tmp_path_factory, smollm2_tokenizer, minilm_tokenizer):
    """(checkpoint, bundle, running server) of a TRL-shaped process reward model."""
    kind = request.param
    tokenizer = smollm2_tokenizer if kind == "decoder" else minilm_tokenizer
    tmp = tmp_path_factory.mktemp(f"prm-{kind}")
    save_tiny_token_classifier(tmp / "ckpt", kind, tokenizer, seed=1)
    result = rm_export("--model", str(tmp / "ckpt"), "--output", str(tmp / "bundle"), "--max-length", "128")
    assert result.returncode == 0, result.stderr
    http_port = free_port()
    server = start_server(tmp / "bundle", tmp / "serve.log", "--http-port", str(http_port))
    server.http = f"http://127.0.0.1:{http_port}"
    yield tmp / "ckpt", tmp / "bundle", server
    stop_server(server)


def torch_steps(checkpoint: Path, prompt: str, steps: list[str]) -> tuple[np.ndarray, tuple[int, ...]]:
    model, tokenizer, metadata = load_reward_model(checkpoint)
    encoded = sample_encoder(tokenizer, metadata.recipe).encode(Sample.from_steps(prompt, steps))
    ids = torch.tensor([encoded.ids])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids))[0, list(encoded.steps)].double().numpy(), encoded.steps


def steps_request(solutions, prompt: str = PROMPT, **options) -> pb.ScoreRequest:
    return pb.ScoreRequest(samples=[pb.Sample(steps=pb.Steps(prompt=prompt, steps=s)) for s in solutions], **options)


def test_each_steps_score_is_pytorchs(prm):
    checkpoint, _, server = prm
    response = server.stub().Score(steps_request(SOLUTIONS), timeout=60)
    for steps, result in zip(SOLUTIONS, response.results):
        expected, positions = torch_steps(checkpoint, PROMPT, steps)
        assert len(result.step_rewards) == len(steps)
        np.testing.assert_allclose(result.step_rewards, expected, atol=1e-4)
        assert tuple(result.step_positions) == positions
        assert result.reward == pytest.approx(min(result.step_rewards))


def test_steps_batched_across_requests_equal_each_alone(prm):
    """Solutions of many lengths sent at once by concurrent callers share packed rows (a decoder's shared
    prompt and first steps computed once); each one's steps equal its own request sent alone."""
    _, _, server = prm
    rng = random.Random(0)
    solutions = [[f"{a} + {b} = {a + b}" for a, b in zip(range(k), range(k, 2 * k))] for k in range(1, 9)]
    solutions += [s[: rng.randint(1, len(s))] for s in SOLUTIONS for _ in range(3)]
    stub = server.stub()
    alone = [stub.Score(steps_request([s], prompt=PROMPT + " (alone)"), timeout=60).results[0] for s in solutions]
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(stub.Score, steps_request([s], prompt=PROMPT + " (alone)"), timeout=60) for s in solutions
        ]
        together = stub.Score(steps_request(solutions, prompt=PROMPT + " (alone)"), timeout=60).results
        concurrent = [f.result().results[0] for f in futures]
    for one, many, parallel in zip(alone, together, concurrent):
        np.testing.assert_allclose(many.step_rewards, one.step_rewards, atol=1e-6)
        np.testing.assert_allclose(parallel.step_rewards, one.step_rewards, atol=1e-6)


def test_steps_sent_as_text_ids_and_steps_agree(prm):
    """A response already ending each step with the step token scores as its step list does; token ids are
    read at every step token they hold (vLLM's STEP rule), here only the steps' (the prompt holds none)."""
    checkpoint, bundle, server = prm
    model, tokenizer, metadata = load_reward_model(checkpoint)
    token = metadata.recipe.step_token
    steps = SOLUTIONS[1]
    encoded = sample_encoder(tokenizer, metadata.recipe).encode(Sample.from_steps(PROMPT, steps))
    request = pb.ScoreRequest(
        samples=[
            pb.Sample(steps=pb.Steps(prompt=PROMPT, steps=steps)),
            pb.Sample(text=pb.TextPair(prompt=PROMPT, response="".join(s + token for s in steps))),
            pb.Sample(tokens=pb.TokenIds(ids=encoded.ids)),
        ]
    )
    as_steps, as_text, as_ids = server.stub().Score(request, timeout=60).results
    for other in (as_text, as_ids):  # the same ids, computed in other rows of the batch
        assert list(other.step_positions) == list(as_steps.step_positions) == list(encoded.steps)
        np.testing.assert_allclose(other.step_rewards, as_steps.step_rewards, atol=1e-6)


@pytest.mark.parametrize(
    ("reduce", "rule"),
    [
        (pb.STEP_REDUCE_UNSPECIFIED, np.min),
        (pb.STEP_REDUCE_MIN, np.min),
        (pb.STEP_REDUCE_LAST, lambda s: s[-1]),
        (pb.STEP_REDUCE_PRODUCT, np.prod),
        (pb.STEP_REDUCE_MEAN, np.mean),
    ],
)
def test_the_reward_is_the_requested_reduction_of_the_steps(prm, reduce, rule):
    _, _, server = prm
    for result in server.stub().Score(steps_request(SOLUTIONS, step_reduce=reduce), timeout=60).results:
        assert result.reward == pytest.approx(float(rule(np.array(result.step_rewards, dtype=np.float64))), abs=1e-6)


def test_the_client_scores_steps_and_model_info_names_the_kind(prm):
    checkpoint, _, server = prm
    with RewardClient(server.target) as client:
        scored = client.score_steps([PROMPT] * 2, SOLUTIONS[:2], reduce="last")
        info = client.model_info()
    for steps, step_scores, reward in zip(SOLUTIONS[:2], scored.steps, scored.rewards):
        np.testing.assert_allclose(step_scores, torch_steps(checkpoint, PROMPT, steps)[0], atol=1e-4)
        assert reward == step_scores[-1]
    _, _, metadata = load_reward_model(checkpoint)
    assert (info.output_kind, info.step_token) == ("steps", metadata.recipe.step_token)


def test_the_cache_answers_steps_exactly(prm, tmp_path):
    """A server with a cache: the second request for the same solutions is answered from it, step for step."""
    _, bundle, _ = prm
    server = start_server(bundle, tmp_path / "serve.log", "--cache-mb", "1")
    try:
        stub = server.stub()
        first = stub.Score(steps_request(SOLUTIONS), timeout=60).results
        again = stub.Score(steps_request(SOLUTIONS[::-1]), timeout=60).results[::-1]
        metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    finally:
        stop_server(server)
    assert [list(r.step_rewards) for r in again] == [list(r.step_rewards) for r in first]
    hits = [
        line for line in metrics.splitlines() if line.startswith("rm_cache_lookups_total") and 'result="hit"' in line
    ]
    assert float(hits[0].split()[-1]) == len(SOLUTIONS)


def bad_requests(token: str) -> list[tuple[pb.ScoreRequest, str]]:
    return [
        (steps_request([["a" + token + "b"]]), f"step 0 holds the step token {token!r}"),
        (steps_request([[]]), "no steps"),
        (pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="x", response=""))]), "the response is empty"),
        (pb.ScoreRequest(samples=[pb.Sample(tokens=pb.TokenIds(ids=[5, 6, 7]))]), "holds no step token"),
        (steps_request([["a"] * 70000]), "70000 steps; at most 65536 per solution"),
        (steps_request([["a"]], normalize=True), "normalize applies to sequence reward models"),
        (steps_request([["a"]], step_reduce=99), "unknown step_reduce 99"),
        (steps_request([[" ".join(["word"] * 300)]]), "steps take"),
    ]


def test_bad_step_inputs_are_refused_with_the_reason(prm):
    checkpoint, _, server = prm
    _, _, metadata = load_reward_model(checkpoint)
    stub = server.stub()
    for request, reason in bad_requests(metadata.recipe.step_token):
        with pytest.raises(grpc.RpcError) as error:
            stub.Score(request, timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert reason in error.value.details()


def test_steps_sent_to_a_sequence_reward_model_are_refused(server):
    with pytest.raises(grpc.RpcError) as error:
        server.stub().Score(steps_request([["a", "b"]]), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sent as steps, but this model scores whole sequences" in error.value.details()


def test_vllm_pooling_answers_step_rows_as_vllms_step_pooling(prm):
    """vLLM's token-classification request bodies (examples/pooling/token_classify/ner_online.py upstream:
    no task, one text; the BAAI/bge-m3 example of vLLM's pooling docs: task token_classify, a list of texts)
    get one row per step token, [P(wrong), P(correct)] as vLLM's STEP pooling gives them for TRL's two
    labels, the same scores gRPC gives; task classify (and /classify) the weakest step."""
    checkpoint, bundle, server = prm
    _, _, metadata = load_reward_model(checkpoint)
    token = metadata.recipe.step_token
    texts = [PROMPT + "".join(s + token for s in steps) for steps in SOLUTIONS[:2]]  # tokenized as one: same ids
    grpc_steps = [list(r.step_rewards) for r in server.stub().Score(steps_request(SOLUTIONS[:2]), timeout=60).results]
    name = bundle.name
    ner = httpx.post(f"{server.http}/pooling", json={"model": name, "input": texts[0]}, timeout=60)
    m3 = httpx.post(
        f"{server.http}/pooling", json={"model": name, "task": "token_classify", "input": texts}, timeout=60
    )
    assert ner.status_code == m3.status_code == 200, (ner.text, m3.text)
    rows = [item["data"] for item in m3.json()["data"]]
    assert ner.json()["data"][0]["data"] == rows[0]
    for got, expected in zip(rows, grpc_steps):
        np.testing.assert_allclose([p for _, p in got], expected, atol=1e-6)
        np.testing.assert_allclose([w + p for w, p in got], 1.0, atol=1e-6)
    classify = httpx.post(f"{server.http}/classify", json={"model": name, "input": texts}, timeout=60).json()
    as_task = httpx.post(f"{server.http}/pooling", json={"input": texts, "task": "classify"}, timeout=60).json()
    for item, task_item, row in zip(classify["data"], as_task["data"], rows):
        assert item["probs"] == task_item["data"] == [min(p for _, p in row)]
    refused = httpx.post(f"{server.http}/pooling", json={"input": texts, "use_activation": False}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "use_activation"


def test_token_classify_on_a_sequence_reward_model_is_refused(token_server):
    url = token_server.http_url.replace("/get_reward", "/pooling")
    body = {"input": "a text", "task": "token_classify"}
    response = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret-token"}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "task"
    assert "one score per sequence" in response.json()["error"]["message"]


def test_an_ensemble_mixing_output_kinds_is_refused(prm, encoder_bundle, tmp_path):
    _, bundle, _ = prm
    repo = tmp_path / "repo"
    for name, source in (("seq", encoder_bundle), ("prm", bundle)):
        shutil.copytree(source, repo / name / "1")
    (repo / "ens").mkdir()
    (repo / "ens" / "ensemble.json").write_text(json.dumps({"members": ["seq", "prm"]}))
    server = start_server(repo, tmp_path / "serve.log", "--default-model", "seq", bundle_flag="--model-repo")
    try:
        request = pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="p", response="r"))], model="ens")
        with pytest.raises(grpc.RpcError) as error:
            server.stub().Score(request, timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "members prm are process reward models" in error.value.details()
    finally:
        stop_server(server)


def test_rm_client_scores_process_reward_rows(prm, tmp_path):
    """TRL's stepwise rows in, each row out with `step_rewards` (one per completion step) and `reward`."""
    checkpoint, _, server = prm
    rows = [{"prompt": PROMPT, "completions": s, "labels": [True] * len(s)} for s in SOLUTIONS]
    source = tmp_path / "steps.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = [str(Path(sys.executable).parent / "rm-client"), "score", "--target", server.target]
    done = subprocess.run(
        [*command, "--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--step-reduce", "last"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    right = 0
    for row, steps in zip(scored, SOLUTIONS):
        expected = torch_steps(checkpoint, PROMPT, steps)[0]
        np.testing.assert_allclose(row["step_rewards"], expected, atol=1e-4)
        assert row["reward"] == pytest.approx(row["step_rewards"][-1])
        right += int(np.sum(expected >= 0.5))
    assert f"step accuracy {right / sum(map(len, SOLUTIONS)):.4f}" in done.stdout
    refused = subprocess.run(
        [*command, "--input", str(source), "--output", str(tmp_path / "x.jsonl"), "--normalize"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "never normalized" in refused.stderr


def test_verl_compute_score_gives_the_weakest_step_and_logs_the_steps(prm):
    checkpoint, _, server = prm
    _, _, metadata = load_reward_model(checkpoint)
    solution = "".join(s + metadata.recipe.step_token for s in SOLUTIONS[1])
    answer = asyncio.run(compute_score("math", solution, None, {"prompt": PROMPT}, target=server.target))
    expected = torch_steps(checkpoint, PROMPT, SOLUTIONS[1])[0]
    assert answer["rm_num_steps"] == len(SOLUTIONS[1])
    assert answer["score"] == pytest.approx(expected.min(), abs=1e-4) == answer["rm_step_min"]
    assert answer["rm_step_last"] == pytest.approx(expected[-1], abs=1e-4)
    assert answer["rm_step_mean"] == pytest.approx(expected.mean(), abs=1e-4)


def test_ppo_against_a_process_reward_model_puts_each_steps_score_where_the_step_ends(prm, tmp_path):
    """rm-ppo cuts a response into steps at the bundle's step token, gets each step's score, puts it (times
    --step-reward-weight) on the policy token ending the step and the min of the steps on the last token;
    GAE runs on the sum."""
    checkpoint, _, server = prm
    _, _, metadata = load_reward_model(checkpoint)
    if metadata.pooling == "cls":
        pytest.skip("the policy's tokenizer is SmolLM2's: the decoder PRM's")
    tokenizer = load_reward_model(checkpoint)[1]
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))
    config = PPOConfig(policy="tiny", reward_target=server.target, prompts="", output=str(tmp_path / "out"))
    config.step_reward_weight = 0.5
    response = "2 + 3 = 5\n5 * 4 = 20\n\nThe answer is 20."
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rollout = Rollout(
        torch.tensor([[1, 2]]),
        torch.ones(1, 2, dtype=torch.long),
        torch.tensor([ids]),
        torch.ones(1, len(ids), dtype=torch.long),
        torch.tensor([True]),
        torch.zeros(1, len(ids)),
    )
    with RewardClient(server.target) as client:
        trainer = PPOTrainer(config, policy, tokenizer, client, [Prompt(text=PROMPT)])
        splits = [split_steps(response, metadata.recipe.step_token)]
        answer = trainer._request_scores([Prompt(text=PROMPT)], [response], splits).result()
        expected = client.score_steps([PROMPT], [["2 + 3 = 5", "5 * 4 = 20", "The answer is 20."]])
    np.testing.assert_array_equal(answer.steps[0], expected.steps[0])  # the blank line is no step
    dense = trainer._dense_rewards(rollout, splits, answer.steps)
    newlines = [k for k, t in enumerate(ids) if tokenizer.decode([t]) in ("\n", "\n\n")]
    ends = [newlines[0], newlines[1], len(ids) - 2]  # the last step ends on its last token, before the eos
    assert torch.nonzero(dense[0]).flatten().tolist() == ends
    np.testing.assert_allclose(dense[0, ends].numpy(), 0.5 * expected.steps[0], atol=1e-6)
    mask = rollout.response_mask.float()
    kl = torch.full(mask.shape, 0.1)
    scores = torch.from_numpy(answer.rewards).float()
    rewards, _ = core.per_token_rewards(scores, kl, mask, 0.05)
    rewards = rewards + dense * mask
    assert rewards[0, -1] == pytest.approx(-0.005 + float(expected.steps[0].min()), abs=1e-6)
    advantages, returns = core.gae(rewards, torch.zeros_like(mask), mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(advantages[0].numpy(), rewards[0].flip(0).cumsum(0).flip(0).numpy(), atol=1e-5)


def test_export_refuses_int8_for_a_process_reward_model(prm, tmp_path):
    checkpoint, _, _ = prm
    rows = tmp_path / "eval.jsonl"
    rows.write_text(json.dumps({"prompt": PROMPT, "completions": SOLUTIONS[0], "labels": [True] * 4}) + "\n")
    args = ("--output", str(tmp_path / "b"), "--dtype", "fp32,int8", "--eval-data", str(rows))
    result = rm_export("--model", str(checkpoint), *args)
    assert result.returncode == 2 and "judged on step accuracy" in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m.pop("output_kind"), "output_kind 'sequence' with recipe template 'steps'"),
        (lambda m: m.pop("step_token_id"), "needs its step_token_id"),
        (lambda m: m.update(step_token_id=m["step_token_id"] + 1), "step_token_id is not the id of recipe.step_token"),
    ],
)
def test_a_bundle_whose_step_fields_disagree_is_refused(prm, tmp_path, change, problem):
    """The encoder, the server's scorer and the batcher each read the steps from the bundle: a bundle whose
    fields disagree would read one sample's scores into another's."""
    _, bundle, _ = prm
    shutil.copytree(bundle, tmp_path / "b")
    edit_manifest(tmp_path / "b", change)
    with pytest.raises(RuntimeError, match=re.escape(problem)):
        stop_server(start_server(tmp_path / "b", tmp_path / "serve.log", timeout_s=60))
