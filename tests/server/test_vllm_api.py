"""vLLM's pooling API on rm-serve's HTTP port, with the request bodies vLLM's clients and veRL's reward loop
send, against a live server holding an encoder bundle and a chat-template decoder bundle: shapes, rewards
(equal to in-process ONNX Runtime on the ids transformers' tokenizer gives), errors, identity."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import shutil
import socket
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pytest

from rm_contract.bundle import load_bundle
from rm_contract.padding import pad_batch
from rm_server.launch import free_port, start_server, stop_server
from rm_server.runtime.engine import open_engine
from tests.conftest import random_texts, served_sha256
from tests.server.test_service import metrics

VERL_PATH = "/data/checkpoints/Skywork-Reward-V2"
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How was the film?"},
    {"role": "assistant", "content": "It was wonderful, I loved every minute."},
]


@pytest.fixture(scope="module")
def repo(encoder_bundle, decoder_bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("vllm-repo")
    for name, bundle in (("toy", encoder_bundle), ("chat", decoder_bundle)):
        shutil.copytree(bundle, repo / name / "1")
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    http_port = free_port()
    # veRL sends its model path as `model`: an alias of the default model
    args = ("--http-port", str(http_port), "--default-model", "toy", "--served-model-name", VERL_PATH, "reward")
    running = start_server(repo, tmp_path_factory.mktemp("vllm") / "serve.log", *args, bundle_flag="--model-repo")
    running.http = f"http://127.0.0.1:{http_port}"
    yield running
    stop_server(running)


class Reference:
    """One bundle scored in this process, one input at a time."""

    def __init__(self, bundle_dir: Path):
        bundle = load_bundle(bundle_dir)
        self.engine, self.pad_id = open_engine(bundle, "fp32"), bundle.manifest.get("pad_token_id") or 0
        self.max_length = bundle.recipe.max_length
        self.sha256 = served_sha256(bundle_dir)

    def __call__(self, ids: list[int]) -> float:
        return float(self.engine.score(*pad_batch([ids], self.pad_id))[0])


@pytest.fixture(scope="module")
def toy(encoder_bundle) -> Reference:
    return Reference(encoder_bundle)


@pytest.fixture(scope="module")
def chat(decoder_bundle) -> Reference:
    return Reference(decoder_bundle)


def post(server, path: str, body: dict | bytes, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers}
    return httpx.post(server.http + path, content=content, headers=headers, timeout=60)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_classify_answers_vllms_shapes_with_the_rewards_of_the_ids_vllm_would_feed(server, toy, minilm_tokenizer):
    """The request bodies of vLLM's own tests (tests/entrypoints/pooling/classify/test_online.py upstream):
    a string, a list of strings, token ids and lists of them. A text is tokenized as vLLM does (the
    tokenizer's special tokens added: [CLS] text [SEP]); use_activation false gives the raw reward, absent
    or true its sigmoid, as vLLM's classifier pooler does for one label."""
    texts = ["It was wonderful.", "It was awful, a waste of an evening.", "ok"]
    ids = [minilm_tokenizer(t)["input_ids"] for t in texts]
    raw = [toy(i) for i in ids]
    every = sum(len(i) for i in ids)
    cases = [
        ({"model": "toy", "input": texts[0], "use_activation": False}, raw[:1], len(ids[0])),
        ({"model": "toy", "input": texts}, [sigmoid(r) for r in raw], every),
        ({"input": texts, "use_activation": True}, [sigmoid(r) for r in raw], every),
        ({"model": "toy", "input": ids[1], "use_activation": False}, raw[1:2], len(ids[1])),
        ({"model": "toy", "input": ids, "activation": False}, raw, every),  # vLLM < 0.11.2's name (older veRL)
        ({"model": VERL_PATH, "input": texts[0], "use_activation": False}, raw[:1], len(ids[0])),  # an alias
    ]
    for body, expected, n_tokens in cases:
        response = post(server, "/classify", body, **{"X-Request-Id": "abc"})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"] == "classify-abc" and answer["object"] == "list" and answer["model"] == "toy"
        assert [d["index"] for d in answer["data"]] == list(range(len(expected)))
        assert all(d["num_classes"] == 1 and len(d["probs"]) == 1 and d["label"] is None for d in answer["data"])
        np.testing.assert_allclose([d["probs"][0] for d in answer["data"]], expected, rtol=1e-5, atol=1e-6)
        assert answer["usage"] == {
            "prompt_tokens": n_tokens,
            "total_tokens": n_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }
        assert answer["reward_model"] == {"name": "toy", "version": "1", "sha256": toy.sha256}
        assert response.headers["X-Reward-Model"] == f"name=toy; version=1; sha256={toy.sha256}"


def test_verl_reward_loop_request_scores_the_conversation_as_messages_do(server, chat, smollm2_tokenizer):
    """veRL's discriminative reward-model call (verl/experimental/reward_loop/reward_loop.py upstream):
    the conversation rendered by the reward model's chat template (BOS stripped where it has one), one
    sample per request, the reward read from data[-1].probs[-1]. SmolLM2's BOS is <|im_start|>, so veRL cuts
    the first one off the conversation (vLLM would score it so). The bundle puts the template's BOS back:
    the text gets the reward of transformers' own ids for the whole rendering, and of the same conversation
    sent as `messages` (templated once, not twice)."""
    rendered = smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
    rm_prompt, bos = rendered, smollm2_tokenizer.bos_token
    if bos is not None and rm_prompt.startswith(bos):
        rm_prompt = rm_prompt[len(bos) :]
    assert rm_prompt != rendered  # the case this test is about
    payload = {"model": "chat", "input": rm_prompt, "use_activation": False}
    verl = post(server, "/classify", payload).json()["data"][-1]["probs"][-1]
    as_messages = post(server, "/classify", {"model": "chat", "messages": CHAT, "use_activation": False}).json()
    kept_bos = post(server, "/classify", {"model": "chat", "input": rendered, "use_activation": False}).json()
    expected = chat(smollm2_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert verl == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert as_messages["data"][0]["probs"][0] == kept_bos["data"][0]["probs"][0] == verl


def test_content_parts_are_joined_as_vllm_joins_them(server):
    """OpenAI-style content parts: text parts joined with newlines (vLLM's chat_utils does so), anything
    else refused: only text is scored."""
    parts = [{"type": "text", "text": "How was"}, {"type": "text", "text": "the film?"}]

    def reward(content) -> float:
        body = {"model": "chat", "messages": [{"role": "user", "content": content}, CHAT[2]], "use_activation": False}
        response = post(server, "/classify", body)
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["probs"][0]

    assert reward(parts) == reward("How was\nthe film?") != reward("How wasthe film?")
    image = [*parts, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    refused = post(server, "/classify", {"model": "chat", "messages": [{"role": "user", "content": image}, CHAT[2]]})
    assert refused.status_code == 400 and "only text content parts" in refused.json()["error"]["message"]


def test_pooling_models_and_health(server, toy, chat, minilm_tokenizer):
    text = "It was wonderful."
    raw = toy(minilm_tokenizer(text)["input_ids"])
    answer = post(server, "/pooling", {"model": "toy", "input": [text, text], "use_activation": False}).json()
    assert answer["id"].startswith("pool-") and answer["object"] == "list"
    assert [(d["index"], d["object"]) for d in answer["data"]] == [(0, "pooling"), (1, "pooling")]
    np.testing.assert_allclose([d["data"] for d in answer["data"]], [[raw], [raw]], rtol=1e-5)
    classify = post(server, "/pooling", {"input": text, "task": "classify"}).json()
    assert classify["data"][0]["data"] == [pytest.approx(sigmoid(raw), rel=1e-5)]

    models = httpx.get(server.http + "/v1/models", timeout=10).json()
    assert models["object"] == "list"
    cards = {card["id"]: card for card in models["data"]}
    assert set(cards) == {"toy", "chat", VERL_PATH, "reward"}
    assert cards[VERL_PATH]["root"] == cards["reward"]["root"] == "toy"
    assert cards["toy"]["max_model_len"] == toy.max_length and cards["chat"]["max_model_len"] == chat.max_length
    assert cards["chat"]["reward_model"] == {"name": "chat", "version": "1", "sha256": chat.sha256}
    assert all(card["object"] == "model" for card in cards.values())
    health = httpx.get(server.http + "/health", timeout=10)
    assert health.status_code == 200 and health.content == b""


def test_served_model_name_renames_a_bundle_and_adds_aliases(encoder_bundle, toy, tmp_path, minilm_tokenizer):
    """vLLM's --served-model-name on a single bundle: answers and /v1/models carry the first name, the others
    are accepted as aliases, and the bundle's own name is no longer one of the served names."""
    http_port = free_port()
    args = ("--http-port", str(http_port), "--served-model-name", "policy-rm", VERL_PATH)
    running = start_server(encoder_bundle, tmp_path / "serve.log", *args)
    running.http = f"http://127.0.0.1:{http_port}"
    try:
        text = "It was wonderful."
        for name in ("policy-rm", VERL_PATH, None):
            body = {"input": text, "use_activation": False} | ({"model": name} if name else {})
            answer = post(running, "/classify", body).json()
            assert answer["model"] == answer["reward_model"]["name"] == "policy-rm"
            assert answer["data"][0]["probs"][0] == pytest.approx(toy(minilm_tokenizer(text)["input_ids"]), rel=1e-5)
        refused = post(running, "/classify", {"model": "toy", "input": text})
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
        cards = httpx.get(running.http + "/v1/models", timeout=10).json()["data"]
        assert [(c["id"], c["root"]) for c in cards] == [("policy-rm", "policy-rm"), (VERL_PATH, "policy-rm")]
    finally:
        stop_server(running)


def test_truncate_prompt_tokens_keeps_the_end_and_the_pooled_first_id(server, toy, minilm_tokenizer):
    """vLLM's test: truncate_prompt_tokens 5 scores 5 tokens; -1 cuts to the model's maximum; without it an
    over-long input is refused, as vLLM refuses it. A cls-pooled encoder keeps [CLS] with the last ids."""
    text = "Terrible, awful, a waste. " + " ".join(["It was a film."] * 60) + " Wonderful, I loved every minute!"
    ids = minilm_tokenizer(text)["input_ids"]
    assert len(ids) > toy.max_length
    five = post(server, "/classify", {"input": text, "truncate_prompt_tokens": 5, "use_activation": False}).json()
    assert five["usage"]["prompt_tokens"] == 5
    assert five["data"][0]["probs"][0] == pytest.approx(toy(ids[:1] + ids[-4:]), rel=1e-5)
    assert abs(toy(ids[:1] + ids[-4:]) - toy(ids[:5])) > 1e-4  # the end is what tells them apart
    longest = post(server, "/classify", {"input": text, "truncate_prompt_tokens": -1, "use_activation": False}).json()
    assert longest["usage"]["prompt_tokens"] == toy.max_length
    expected = toy(ids[:1] + ids[len(ids) - toy.max_length + 1 :])
    assert longest["data"][0]["probs"][0] == pytest.approx(expected, rel=1e-5)
    refused = post(server, "/classify", {"input": text})
    assert refused.status_code == 400 and "truncate_prompt_tokens" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, body, status, kind, param, message",
    [
        ("/classify", b"{not json", 400, "BadRequestError", None, "not valid JSON"),
        ("/classify", b"[1]", 400, "BadRequestError", None, "JSON object"),
        ("/classify", {"input": ""}, 400, "BadRequestError", "input", "empty text"),
        ("/classify", {"input": []}, 400, "BadRequestError", "input", "not empty"),
        ("/classify", {"input": ["a", [1, 2]]}, 400, "BadRequestError", "input", "mixes kinds"),
        ("/classify", {"input": [101, -5, 102]}, 400, "BadRequestError", "input", "integers >= 0"),
        ("/classify", {"input": [101, 10**9, 102]}, 400, "BadRequestError", "input", "outside the vocabulary"),
        ("/classify", {"input": "a", "messages": CHAT}, 400, "BadRequestError", "input", "exactly one of"),
        ("/classify", {"model": "nope", "input": "a"}, 404, "NotFoundError", "model", "'nope' is not loaded"),
        ("/classify", {"model": 3, "input": "a"}, 400, "BadRequestError", "model", "must be a string"),
        ("/classify", {"model": False, "input": "a"}, 400, "BadRequestError", "model", "must be a string"),
        ("/classify", b"[" * 100000, 400, "BadRequestError", None, "nested too deeply"),
        ("/classify", {"input": "\ud800"}, 400, "BadRequestError", "input", "not valid Unicode"),
        ("/classify", {"input": [[101, 102]] * 4097}, 400, "BadRequestError", "input", "at most 4096"),
        ("/classify", {"input": [1.0, 2.0]}, 400, "BadRequestError", "input", "token ids must be integers >= 0"),
        ("/classify", {"input": [7] * 1_000_001}, 400, "BadRequestError", "input", "1000001 token ids; at most"),
        ("/classify", {"input": "a", "use_activation": "no"}, 400, "BadRequestError", "use_activation", "true or"),
        (
            "/classify",
            {"input": "a", "truncate_prompt_tokens": 0},
            400,
            "BadRequestError",
            "truncate_prompt_tokens",
            ">= 1",
        ),
        (
            "/classify",
            {"input": "a", "truncate_prompt_tokens": 100000},
            400,
            "BadRequestError",
            "truncate_prompt_tokens",
            "truncate_prompt_tokens=100000",
        ),
        ("/classify", {"input": "a", "truncation_side": "right"}, 400, "BadRequestError", "truncation_side", "end"),
        (
            "/classify",
            {"messages": CHAT, "add_generation_prompt": True},
            400,
            "BadRequestError",
            "add_generation_prompt",
            "after the assistant",
        ),
        ("/classify", {"messages": CHAT[:2]}, 400, "BadRequestError", "messages", "must end with the assistant"),
        ("/classify", {"messages": [{"role": "user"}]}, 400, "BadRequestError", "messages", "'content'"),
        ("/classify", {"input": ["a"] * 5000}, 400, "BadRequestError", "input", "at most"),
        (
            "/pooling",
            {"input": "a", "task": "token_classify"},
            400,
            "BadRequestError",
            "task",
            "Task token_classify is not supported",
        ),
        ("/pooling", {"input": "a", "dimensions": 8}, 400, "BadRequestError", "dimensions", "not supported"),
        ("/pooling", {"input": "a", "encoding_format": "base64"}, 400, "BadRequestError", "encoding_format", "float"),
    ],
)
def test_errors_have_vllms_shape_and_name_the_problem(server, path, body, status, kind, param, message):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == kind and error["param"] == param
    assert message in error["message"], error["message"]


def test_compressed_bodies_are_refused_before_they_are_read(server):
    """Compressed bodies, valid or corrupt, are refused with a JSON 415 before they are read: a few hundred
    KB of gzip unpacks to tens of MB of JSON, which parsed on the event loop stalls every caller for seconds."""
    small = gzip.compress(json.dumps({"input": "Lovely."}).encode())
    for body in (small, b"\x1f\x8b not gzip"):
        response = post(server, "/classify", body, **{"Content-Encoding": "gzip"})
        assert response.status_code == 415, response.text
        assert "Content-Encoding 'gzip' is not accepted" in response.json()["error"]["message"]


def test_malformed_http_requests_do_not_flood_the_log(server):
    """aiohttp logs each malformed request at ERROR with a traceback and the raw header: 2,000 of them wrote
    1.2 MB of log in a second. They are logged at most one line per 10 s, without the traceback."""
    port = int(server.http.rsplit(":", 1)[1])
    before = len(server.log())
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
            assert connection.recv(4096).startswith(b"HTTP/1.")  # answered 400 by aiohttp
    written = server.log()[before:]
    assert len(written) < 2000 and written.count("Traceback") == 0, written[:3000]


def test_concurrent_single_sample_requests_are_batched_and_equal_to_one_by_one(server, toy, minilm_tokenizer):
    """How OpenRLHF and veRL call: one sample per request, many at once (aiohttp, as both use). Every answer
    equals the sample scored alone, and the server formed batches of several requests."""
    texts = [f"{p} {r}" for p, r in random_texts(random.Random(4), 200)]
    expected = [toy(minilm_tokenizer(t)["input_ids"]) for t in texts]
    before = batch_histogram(server)

    async def run() -> list[float]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def one(text: str) -> float:
                body = {"model": "toy", "input": text, "use_activation": False}
                async with session.post(server.http + "/classify", json=body) as response:
                    assert response.status == 200, await response.text()
                    return (await response.json())["data"][-1]["probs"][-1]

            return await asyncio.gather(*(one(t) for t in texts))

    got = asyncio.run(run())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    after = batch_histogram(server)
    batches, rows = after[0] - before[0], after[1] - before[1]
    assert rows == len(texts) and batches < len(texts) / 2, (batches, rows)


def batch_histogram(server) -> tuple[float, float]:
    """(batches, rows) the server has run, from its Prometheus metrics."""
    values = metrics(server)
    return values["rm_batch_size_count"], values["rm_batch_size_sum"]
