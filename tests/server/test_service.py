"""rm-serve against a real server process: every RPC, sample forms, errors, batch invariance, metrics."""

from __future__ import annotations

import json
import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from rm_contract.bundle import load_bundle
from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import Sample
from tests.conftest import random_texts, served_sha256


def text(prompt: str, response: str) -> pb.Sample:
    return pb.Sample(text=pb.TextPair(prompt=prompt, response=response))


def metrics(server) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_score_returns_one_reward_per_sample_in_order_with_metadata(server, reference):
    texts = [("How was the food?", "Wonderful, truly excellent."), ("How was the food?", "Terrible.")]
    response = server.stub().Score(pb.ScoreRequest(request_id="abc", samples=[text(p, r) for p, r in texts]))
    assert response.request_id == "abc"
    assert [r.reward for r in response.results] == pytest.approx([reference(p, r) for p, r in texts], abs=1e-5)
    assert response.results[0].reward > response.results[1].reward
    assert response.model_name == "toy" and response.model_version == "1"
    assert all(r.num_tokens > 0 and not r.truncated for r in response.results)
    timing = response.timing
    assert timing.total_ms >= timing.inference_ms > 0 and timing.tokenization_ms > 0


def test_conversations_and_token_ids_score_like_text(server, encoder_bundle):
    stub = server.stub()
    as_text = stub.Score(pb.ScoreRequest(samples=[text("How was the food?", "Lovely.")])).results[0]
    conversation = pb.Conversation(
        messages=[pb.Message(role="user", content="How was the food?"), pb.Message(role="assistant", content="Lovely.")]
    )
    as_conversation = stub.Score(pb.ScoreRequest(samples=[pb.Sample(conversation=conversation)])).results[0]
    ids = load_bundle(encoder_bundle).sample_encoder().encode(Sample.from_text("How was the food?", "Lovely.")).ids
    as_ids = stub.Score(pb.ScoreRequest(samples=[pb.Sample(tokens=pb.TokenIds(ids=ids))])).results[0]
    assert as_conversation.reward == pytest.approx(as_text.reward, abs=1e-6)
    assert as_ids.reward == pytest.approx(as_text.reward, abs=1e-6)
    assert as_ids.num_tokens == len(ids)


def test_over_long_token_ids_keep_the_token_a_cls_encoder_pools(server, encoder_bundle):
    """Cut from the left, over-long ids lost [CLS], and the head of a cls-pooled encoder read an arbitrary
    token (a reward returned anyway). [CLS] stays, then the end of the ids, as the text policy keeps them."""
    bundle = load_bundle(encoder_bundle)
    assert bundle.manifest["pooling"] == "cls" and bundle.recipe.max_length == 256
    encoder = bundle.sample_encoder()
    long_prompt = "The food was lovely and the staff were kind. " * 40
    ids = encoder.encode(Sample.from_text(long_prompt, "Lovely.")).ids  # [CLS] prompt's end [SEP] response [SEP]
    extra = encoder.tokenizer.encode("A slow evening by the sea. " * 20, add_special_tokens=False).ids[:100]
    over_long = ids[:1] + extra + ids[1:]  # 100 ids too many, after [CLS]
    stub = server.stub()
    kept = stub.Score(pb.ScoreRequest(samples=[pb.Sample(tokens=pb.TokenIds(ids=over_long))])).results[0]
    exact = stub.Score(pb.ScoreRequest(samples=[pb.Sample(tokens=pb.TokenIds(ids=ids))])).results[0]
    assert kept.truncated and kept.num_tokens == 256 and not exact.truncated
    assert kept.reward == pytest.approx(exact.reward, abs=1e-6)  # exactly the 256 ids that fit, [CLS] first


def test_an_empty_response_is_scored_as_the_model_sees_it(server, reference):
    """A policy may answer with EOS alone; the trainer still needs its reward."""
    result = server.stub().Score(pb.ScoreRequest(samples=[text("How was the trip?", "")])).results[0]
    assert result.reward == pytest.approx(reference("How was the trip?", ""), abs=1e-5)


def test_normalized_rewards_use_the_bundle_statistics(server, encoder_bundle):
    stats = json.loads((encoder_bundle / "bundle.json").read_text())["normalization"]
    samples = [text("How was the trip?", "Great fun.")]
    raw = server.stub().Score(pb.ScoreRequest(samples=samples)).results[0].reward
    normalized = server.stub().Score(pb.ScoreRequest(samples=samples, normalize=True))
    assert normalized.normalized
    assert normalized.results[0].reward == pytest.approx((raw - stats["mean"]) / stats["std"], abs=1e-4)


def test_overlong_samples_are_truncated_or_refused_in_strict_mode(server):
    long_prompt = "word " * 2000
    response = server.stub().Score(pb.ScoreRequest(samples=[text("short", "fine"), text(long_prompt, "It was great.")]))
    assert [r.truncated for r in response.results] == [False, True]
    assert response.results[1].num_tokens == 256
    with pytest.raises(grpc.RpcError) as error:
        server.stub().Score(
            pb.ScoreRequest(
                samples=[text("short", "fine"), text(long_prompt, "x")], truncation=pb.TRUNCATION_POLICY_STRICT
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sample 1: longer than the model's maximum of 256 tokens" in error.value.details()


def test_compare_and_rank(server, reference, encoder_bundle):
    stub = server.stub()
    sha256 = served_sha256(encoder_bundle)
    prompt, good, bad = "How was the food?", "The food was excellent.", "The food was awful."
    compared = stub.Compare(pb.CompareRequest(prompt=prompt, response_a=good, response_b=bad))
    expected = 1 / (1 + np.exp(-(reference(prompt, good) - reference(prompt, bad))))
    assert compared.probability_a_preferred == pytest.approx(expected, abs=1e-5)
    assert compared.probability_a_preferred > 0.5
    responses = [bad, good, "The food was ok."]
    ranked = stub.Rank(pb.RankRequest(prompt=prompt, responses=responses))
    expected_rewards = [reference(prompt, r) for r in responses]
    assert list(ranked.order) == sorted(range(3), key=lambda i: -expected_rewards[i])
    assert list(ranked.order)[0] == 1
    assert list(ranked.rewards) == pytest.approx(expected_rewards, abs=1e-5)
    assert compared.model_sha256 == ranked.model_sha256 == sha256  # the bundle that scored, in every answer
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_sha256 == sha256 and [m.model_sha256 for m in info.loaded] == [sha256]


def test_model_info_describes_the_bundle(server, encoder_bundle):
    info = server.stub().GetModelInfo(pb.GetModelInfoRequest())
    manifest = json.loads((encoder_bundle / "bundle.json").read_text())
    assert (info.name, info.version, info.max_length, info.pooling, info.dtype) == ("toy", "1", 256, "cls", "fp32")
    assert info.normalization.mean == pytest.approx(manifest["normalization"]["mean"])
    assert info.max_samples_per_request == 64
    assert json.loads(info.bundle_json)["files"] == manifest["files"]


def test_score_stream_ties_responses_to_requests(server, reference):
    rng = random.Random(5)
    batches = {f"req-{i}": random_texts(rng, rng.randint(1, 6)) for i in range(12)}
    requests = [pb.ScoreRequest(request_id=k, samples=[text(p, r) for p, r in v]) for k, v in batches.items()]
    requests.append(pb.ScoreRequest(request_id="bad", samples=[]))
    responses = {r.request_id: r for r in server.stub().ScoreStream(iter(requests))}
    assert set(responses) == set(batches) | {"bad"}
    assert responses["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no samples" in responses["bad"].error.message
    for request_id, texts in batches.items():
        got = [r.reward for r in responses[request_id].results]
        assert got == pytest.approx([reference(p, r) for p, r in texts], abs=1e-5)


def test_rewards_do_not_depend_on_concurrent_traffic(server, reference):
    """Many clients, random batch sizes and lengths: every reward equals the sample scored alone, though the
    engine ran them in batches of several rows (counted by the server's batch-size histogram)."""
    before = metrics(server)
    rng = random.Random(0)
    requests = [random_texts(rng, rng.randint(1, 32)) for _ in range(48)]
    stub = server.stub()

    def send(texts):
        return [
            r.reward for r in stub.Score(pb.ScoreRequest(samples=[text(p, r) for p, r in texts]), timeout=60).results
        ]

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(send, requests))
    after = metrics(server)
    grown = {
        key: after[key] - before.get(key, 0.0) for key in ("rm_batch_size_count", 'rm_batch_size_bucket{le="1.0"}')
    }
    assert grown["rm_batch_size_count"] - grown['rm_batch_size_bucket{le="1.0"}'] > 0  # batches of 2+ rows ran
    worst = max(
        abs(got - reference(p, r)) for texts, rewards in zip(requests, answers) for (p, r), got in zip(texts, rewards)
    )
    assert worst <= 1e-5


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([], "request has no samples"),
        ([pb.Sample()], "sample 0: no input"),
        (
            [pb.Sample(conversation=pb.Conversation(messages=[pb.Message(role="robot", content="hi")]))],
            "sample 0: message 0 has unknown role 'robot'",
        ),
        (
            [pb.Sample(conversation=pb.Conversation(messages=[pb.Message(role="user", content="hi")]))],
            "sample 0: a conversation must end with the assistant message",
        ),
        (
            [text("Q", "ok"), pb.Sample(tokens=pb.TokenIds(ids=[101, 10**9]))],
            "sample 1: token id 1000000000 is outside",
        ),
        ([pb.Sample(tokens=pb.TokenIds(ids=[]))], "sample 0: empty token ids"),
        ([text("Q", "ok")] * 65, "request has 65 samples; at most 64 are accepted"),
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_sample(server, samples, message):
    with pytest.raises(grpc.RpcError) as error:
        server.stub().Score(pb.ScoreRequest(samples=samples))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert server.health() == 1  # still SERVING


def test_metrics_count_the_traffic_sent(server):
    before = metrics(server)
    stub = server.stub()
    for n in (1, 3, 5):
        stub.Score(pb.ScoreRequest(samples=[text("Q", "It was fine.")] * n))
    with pytest.raises(grpc.RpcError):
        stub.Score(pb.ScoreRequest(samples=[]))
    after = metrics(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('rm_requests_total{code="OK",method="Score"}') == 3
    assert delta('rm_requests_total{code="INVALID_ARGUMENT",method="Score"}') == 1
    assert delta("rm_samples_total") == 9
    assert delta('rm_latency_seconds_count{stage="inference"}') == 3
    assert after["rm_queue_depth"] == 0
    assert after['rm_model_loaded{model="toy",version="1"}'] == 1
    assert after['rm_model_info{providers="cpu",variant="fp32"}'] == 1


def test_the_int8_variant_is_served_and_named_apart_from_fp32(encoder_bundle, tmp_path):
    """`--variant int8` scores with the int8 graph (equal to it in this process, one by one), and its answers
    carry another identity than the same bundle's fp32: their rewards differ."""
    from rm_contract.padding import pad_batch
    from rm_server.launch import start_server, stop_server
    from rm_server.runtime.engine import open_engine

    bundle = load_bundle(encoder_bundle)
    int8, fp32 = (open_engine(bundle, v) for v in ("int8", "fp32"))
    encoder = bundle.sample_encoder()
    texts = random_texts(random.Random(6), 24)
    ids = [encoder.encode(Sample.from_text(p, r)).ids for p, r in texts]
    server = start_server(encoder_bundle, tmp_path / "serve.log", "--variant", "int8")
    try:
        response = server.stub().Score(pb.ScoreRequest(samples=[text(p, r) for p, r in texts]))
    finally:
        stop_server(server)
    expected = [float(int8.score(*pad_batch([i], 0))[0]) for i in ids]
    np.testing.assert_allclose([r.reward for r in response.results], expected, atol=1e-4)
    fp32_rewards = [float(fp32.score(*pad_batch([i], 0))[0]) for i in ids]
    assert not np.allclose(expected, fp32_rewards, atol=1e-4)  # so telling them apart matters
    assert response.model_sha256 == served_sha256(encoder_bundle, "int8") != served_sha256(encoder_bundle, "fp32")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"truncation": 99}, "unknown truncation 99"),
        ({"ensemble_reduce": 99}, "unknown ensemble_reduce 99"),
        ({"ensemble_k": float("nan")}, "ensemble_k must be a finite number >= 0"),
    ],
)
def test_unknown_options_are_refused_even_where_they_would_not_apply(server, fields, message):
    """A value this server does not know (a newer client's enum, NaN) is refused, not silently ignored, on a
    single model as on an ensemble."""
    with pytest.raises(grpc.RpcError) as refused:
        server.stub().Score(pb.ScoreRequest(samples=[text("Q", "A")], **fields), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()


def test_every_samples_size_is_checked_before_any_is_tokenized(server):
    """An over-long text is refused before the request's other samples cost tokenizer time: the refusal
    names it even though an earlier sample (bad token ids) would fail once tokenized."""
    bad_ids = pb.Sample(tokens=pb.TokenIds(ids=[101, 10**9, 102]))
    too_long = text("Q", "x" * 1_000_001)
    with pytest.raises(grpc.RpcError) as refused:
        server.stub().Score(pb.ScoreRequest(samples=[bad_ids, too_long]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sample 1: 1000002 characters; at most 1000000" in refused.value.details()
