"""The HTTP port as a transport: what it refuses before any route runs (compressed bodies, bad or doubled
Authorization headers), OpenRLHF's empty generations, and the metrics every transport records through the
inference core."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.test_service import metrics


@pytest.fixture(scope="module")
def server(token_server):
    """The token server (conftest.py), with its HTTP base URL."""
    token_server.http = token_server.http_url.removesuffix("/get_reward")
    return token_server


TOKEN = {"Authorization": "Bearer s3cret-token"}
ROUTES = (("/get_reward", {"query": ["Hi there"], "prompts": ["Hi"]}), ("/classify", {"input": "Hi there"}))


def error_message(response: httpx.Response) -> str:
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


@pytest.mark.parametrize("encoding", ["br", "gzip", "deflate", "zstd"])
def test_compressed_bodies_get_415_in_the_routes_error_shape(server, encoding):
    """`Content-Encoding: br` reached aiohttp's decoder, which answered a plain-text 400 naming a missing
    package; every encoding is refused as documented, 415 with a JSON body, before the body is read."""
    for path, body in ROUTES:
        headers = {**TOKEN, "Content-Type": "application/json", "Content-Encoding": encoding}
        response = httpx.post(server.http + path, content=json.dumps(body).encode(), headers=headers, timeout=30)
        assert response.status_code == 415, response.text
        assert f"Content-Encoding '{encoding}' is not accepted" in error_message(response)


def test_an_authorization_header_that_is_not_utf8_is_unauthenticated(server):
    """A byte that is not UTF-8 in the header is a 401 with a JSON error, not a plain-text 500 (an
    UnicodeEncodeError in the log)."""
    for path, body in ROUTES:
        headers = {b"Authorization": b"Bearer s3cret-token\xff"}
        response = httpx.post(server.http + path, json=body, headers=headers, timeout=30)
        assert response.status_code == 401, response.text
        assert "bearer token" in error_message(response)
    assert "UnicodeEncodeError" not in server.log()


def test_two_authorization_headers_are_refused_whichever_comes_first(server):
    """Which of two headers a proxy or a framework reads differs: neither is taken."""
    for path, body in ROUTES:
        for pair in (("Bearer s3cret-token", "Bearer wrong"), ("Bearer wrong", "Bearer s3cret-token")):
            headers = [("Authorization", pair[0]), ("Authorization", pair[1])]
            response = httpx.post(server.http + path, json=body, headers=headers, timeout=30)
            assert response.status_code == 400, response.text
            assert "more than one Authorization header" in error_message(response)
        assert httpx.post(server.http + path, json=body, headers=TOKEN, timeout=30).status_code == 200


def test_openrlhf_scores_an_empty_generation_instead_of_failing_the_batch(server):
    """One empty generation must not fail a training step: it is scored, as gRPC and /classify score it."""
    body = {"query": ["How was it?", "How was it?Lovely."], "prompts": ["How was it?", "How was it?"]}
    response = httpx.post(server.http + "/get_reward", json=body, headers=TOKEN, timeout=30)
    assert response.status_code == 200, response.text
    rewards = response.json()["rewards"]
    assert len(rewards) == 2 and rewards[0] != rewards[1]


def test_http_requests_are_in_the_stage_latencies_and_truncation_count(server):
    """Every transport records the same metrics: a /classify and a /get_reward call each add one observation
    per stage, and an over-long input cut to the maximum counts as truncated."""
    stages = ("queue", "tokenization", "inference")

    def counts() -> dict[str, float]:
        values = metrics(server)
        found = {s: values.get(f'rm_latency_seconds_count{{stage="{s}"}}', 0.0) for s in stages}
        return {**found, "truncated": values.get("rm_truncated_samples_total", 0.0)}

    before = counts()
    long_input = {"input": "word " * 2000, "truncate_prompt_tokens": -1, "use_activation": False}
    assert httpx.post(server.http + "/classify", json=long_input, headers=TOKEN, timeout=60).status_code == 200
    after_classify = counts()
    assert all(after_classify[s] == before[s] + 1 for s in stages), (before, after_classify)
    assert after_classify["truncated"] == before["truncated"] + 1
    body = {"query": ["Hi there"], "prompts": ["Hi"]}
    assert httpx.post(server.http + "/get_reward", json=body, headers=TOKEN, timeout=30).status_code == 200
    after_openrlhf = counts()
    assert all(after_openrlhf[s] == after_classify[s] + 1 for s in stages)
