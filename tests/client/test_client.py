"""RewardClient and AsyncRewardClient against real rm-serve processes on loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from rm_client import AsyncRewardClient, RetryPolicy, RewardClient, RewardServiceError
from rm_client.samples import text_samples
from rm_contract.pb import reward_pb2 as pb
from rm_server.launch import free_port, start_server, stop_server
from tests.conftest import random_texts
from tests.server.test_service import metrics

LIMIT = 16
"""The servers here accept at most this many samples per request, so chunking is exercised."""


@pytest.fixture(scope="module")
def server(encoder_bundle, tmp_path_factory):
    running = start_server(
        encoder_bundle, tmp_path_factory.mktemp("server") / "serve.log", "--max-samples-per-request", str(LIMIT)
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.target, timeout_s=60) as c:
        yield c


def expected(reference, texts) -> np.ndarray:
    return np.array([reference(p, r) for p, r in texts], dtype=np.float32)


def test_score_methods_return_the_servers_rewards_in_input_order(client, reference):
    texts = random_texts(random.Random(0), 5)
    prompts, responses = zip(*texts)
    want = expected(reference, texts)
    np.testing.assert_allclose(client.score(prompts, responses), want, atol=1e-5)
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in texts]
    by_conversation = client.score_conversations(conversations)
    by_completion = client.score_completions(
        [[{"role": "user", "content": p}] for p in prompts], [[{"role": "assistant", "content": r}] for r in responses]
    )
    np.testing.assert_allclose(by_conversation, by_completion, atol=1e-6)
    assert client.score_completions(list(prompts), list(responses)).tolist() == pytest.approx(want, abs=1e-5)


def test_token_ids_compare_rank_info_and_health(client, server, reference, encoder_bundle):
    from rm_contract.bundle import load_bundle
    from rm_contract.recipe import Sample

    encoder = load_bundle(encoder_bundle).sample_encoder()
    texts = [("How was the food?", "Wonderful."), ("How was the food?", "Awful.")]
    ids = [encoder.encode(Sample.from_text(p, r)).ids for p, r in texts]
    np.testing.assert_allclose(client.score_tokens(ids), expected(reference, texts), atol=1e-5)

    comparison = client.compare("How was the food?", "Wonderful.", "Awful.")
    assert comparison.reward_a == pytest.approx(reference(*texts[0]), abs=1e-5)
    assert comparison.probability_a_preferred == pytest.approx(
        1 / (1 + np.exp(comparison.reward_b - comparison.reward_a)), abs=1e-6
    )
    ranking = client.rank("How was the food?", ["Awful.", "Wonderful.", "It was ok."])
    assert sorted(ranking.order) == [0, 1, 2]
    assert list(ranking.rewards[ranking.order]) == sorted(ranking.rewards, reverse=True)
    info = client.model_info()
    assert info.name == "toy" and info.max_samples_per_request == LIMIT
    assert client.health() == "SERVING"


def test_requests_over_the_server_limit_are_split_and_reassembled(client, server, reference):
    texts = random_texts(random.Random(1), 5 * LIMIT + 3)
    with pytest.raises(grpc.RpcError) as raw:  # what the client saves its users from
        server.stub().Score(pb.ScoreRequest(samples=text_samples(*zip(*texts))), timeout=30)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rewards = client.score(*zip(*texts))
    assert rewards.shape == (len(texts),)
    np.testing.assert_allclose(rewards, expected(reference, texts), atol=1e-5)


def test_bad_input_raises_with_the_servers_message_and_is_not_retried(client):
    with pytest.raises(RewardServiceError) as error:
        client.score_tokens([[1, 2, 10**9]])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the vocabulary" in error.value.message and error.value.attempts == 1
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        client.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="truncation"):
        client.score(["a"], ["b"], truncation="sometimes")


def test_deadline_exceeded_raises(server):
    texts = random_texts(random.Random(2), 2000)
    with RewardClient(server.target, timeout_s=0.05) as hurried:
        with pytest.raises(RewardServiceError) as error:
            hurried.score(*zip(*texts))
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_one_deadline_covers_every_chunk_of_a_call(encoder_bundle, tmp_path):
    """`timeout_s` bounds the whole call, not each chunk: a call of 20 chunks sent one at a time fails after
    `timeout_s`, not 20 times it. Each chunk here waits 200 ms in the server's batcher (`--max-delay-ms`:
    never a full batch), so the call needs at least 4 s; its deadline is 1 s."""
    slow = start_server(
        encoder_bundle, tmp_path / "serve.log", "--max-samples-per-request", str(LIMIT), "--max-delay-ms", "200"
    )
    try:
        with RewardClient(slow.target, timeout_s=1, max_in_flight=1) as client:
            client.model_info()  # connected
            started = time.monotonic()
            with pytest.raises(RewardServiceError) as error:
                client.score(["How was it?"] * (20 * LIMIT), ["Fine."] * (20 * LIMIT))
            took = time.monotonic() - started
    finally:
        stop_server(slow)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "chunks answered" in error.value.message
    assert took < 3.5  # 1 s and the cancelled chunks' clean-up; the whole call would take 4 s or more


def test_the_first_failed_chunk_cancels_the_others(server):
    """When one chunk of a call fails, `score` raises and none of its siblings is sent (or retried) after
    the failure, in the background or otherwise."""
    sequences = [[101, 10**9, 102]] + [[101, 2000, 102]] * (10 * LIMIT - 1)  # chunk 0 holds a bad id
    scored = lambda: metrics(server)["rm_samples_total"]  # noqa: E731
    with RewardClient(server.target, timeout_s=30, max_in_flight=1) as client:
        before = scored()
        with pytest.raises(RewardServiceError) as error:
            client.score_tokens(sequences)
        time.sleep(1)  # siblings left running would be answered by now (a chunk takes milliseconds)
        after = scored()
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert after == before


def test_unreachable_service_raises_after_the_retries(server):
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    with RewardClient(f"127.0.0.1:{free_port()}", retry=policy, timeout_s=30) as lost:
        with pytest.raises(RewardServiceError) as error:
            lost.score(["hi"], ["hello"])
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and error.value.attempts == 3


def test_async_client_and_stream_helper(server, reference):
    texts = random_texts(random.Random(3), 40)
    requests = [text_samples(*zip(*texts[i : i + 4])) for i in range(0, len(texts), 4)]

    async def run():
        async with AsyncRewardClient(server.target) as client:
            whole = await client.score(*zip(*texts))
            streamed = {i: r async for i, r in client.stream_scores(requests, in_flight=3)}
            return whole, streamed

    whole, streamed = asyncio.run(run())
    want = expected(reference, texts)
    np.testing.assert_allclose(whole, want, atol=1e-5)
    assert sorted(streamed) == list(range(len(requests)))
    np.testing.assert_allclose(np.concatenate([streamed[i] for i in range(len(requests))]), want, atol=1e-5)


def test_retry_then_success_after_a_server_restart(encoder_bundle, tmp_path, reference, caplog):
    port = free_port()
    first = start_server(encoder_bundle, tmp_path / "first.log", port=port)
    policy = RetryPolicy(max_attempts=30, initial_backoff_s=0.2, max_backoff_s=1.0)
    with RewardClient(first.target, retry=policy, timeout_s=120) as client:
        assert client.health() == "SERVING"
        stop_server(first)
        restarted = {}
        threading.Thread(
            target=lambda: restarted.update(s=start_server(encoder_bundle, tmp_path / "second.log", port=port))
        ).start()
        try:
            rewards = client.score(["How was the trip?"], ["It was wonderful."])  # sent while the port is closed
        finally:
            deadline = time.monotonic() + 120
            while "s" not in restarted and time.monotonic() < deadline:
                time.sleep(0.1)
            stop_server(restarted["s"])
    assert rewards[0] == pytest.approx(reference("How was the trip?", "It was wonderful."), abs=1e-5)
    assert "UNAVAILABLE (attempt 1 of 30); retrying" in caplog.text


def test_retries_are_budgeted_across_calls():
    """One client's retries within a window are at most a floor plus 20% of its calls: 50 calls in flight
    against a failing service send at most 70 attempts, not 50 times max_attempts (a storm that many ranks
    would also send the moment the service came back)."""
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.02, budget_min_per_s=1)

    async def storm():
        async with AsyncRewardClient(f"127.0.0.1:{free_port()}", retry=policy, timeout_s=30) as client:
            return await asyncio.gather(*(client.score(["hi"], ["hello"]) for _ in range(50)), return_exceptions=True)

    errors = asyncio.run(storm())
    assert all(isinstance(e, RewardServiceError) and e.code == grpc.StatusCode.UNAVAILABLE for e in errors)
    attempts = sum(e.attempts for e in errors)
    assert 50 < attempts <= 50 + 10 + 0.2 * 50  # the floor (1/s over 10 s) and 20% of the calls
    assert any("retry budget spent" in e.message for e in errors)


def test_a_stream_broken_by_a_restart_is_reopened_and_its_unanswered_requests_resent(
    encoder_bundle, tmp_path, reference
):
    """A replica restart mid-stream does not fail `stream_scores`: the stream is reopened and the requests
    it left unanswered are sent again, each answered once."""
    port = free_port()
    first = start_server(encoder_bundle, tmp_path / "first.log", port=port)
    texts = random_texts(random.Random(5), 60)
    requests = [text_samples(*zip(*texts[i : i + 3])) for i in range(0, len(texts), 3)]
    restarted = {}

    def slowly():  # rollouts arriving over time; the server goes down after the fifth
        for i, request in enumerate(requests):
            if i == 5:
                stop_server(first)
                threading.Thread(
                    target=lambda: restarted.update(s=start_server(encoder_bundle, tmp_path / "second.log", port=port))
                ).start()
            time.sleep(0.05)
            yield request

    async def run():
        policy = RetryPolicy(max_attempts=30, initial_backoff_s=0.2, max_backoff_s=1.0)
        async with AsyncRewardClient(first.target, retry=policy, timeout_s=120) as client:
            return {i: r async for i, r in client.stream_scores(slowly(), in_flight=2)}

    try:
        streamed = asyncio.run(run())
    finally:
        deadline = time.monotonic() + 120
        while "s" not in restarted and time.monotonic() < deadline:
            time.sleep(0.1)
        stop_server(restarted["s"])
    assert sorted(streamed) == list(range(len(requests)))
    got = np.concatenate([streamed[i] for i in range(len(requests))])
    np.testing.assert_allclose(got, expected(reference, texts), atol=1e-5)


def test_stream_scores_takes_truncation_as_score_samples_does(server):
    """A sample longer than the model's maximum (ModelInfo.max_length) is cut and scored by default, and
    refused with INVALID_ARGUMENT under `truncation="strict"`, over a stream as in a unary call."""

    async def run():
        async with AsyncRewardClient(server.target, timeout_s=60) as client:
            max_length = (await client.model_info()).max_length
            overlong = text_samples(["word " * (2 * max_length)], ["It was great."])
            streamed = [rewards async for _, rewards in client.stream_scores([overlong])]
            unary = await client.score_samples(overlong)
            with pytest.raises(RewardServiceError) as strict:
                async for _ in client.stream_scores([overlong], truncation="strict"):
                    pass
            with pytest.raises(ValueError, match="truncation"):
                async for _ in client.stream_scores([overlong], truncation="sometimes"):
                    pass
            return max_length, streamed, unary, strict.value

    max_length, streamed, unary, refusal = asyncio.run(run())
    np.testing.assert_allclose(streamed[0], unary, atol=1e-6)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT and refusal.attempts == 1
    assert f"longer than the model's maximum of {max_length} tokens" in refusal.message


def test_a_stream_has_a_deadline_and_a_slow_request_source_does_not_block_the_loop(server):
    """`stream_scores` has a deadline (a stalled stream does not wait forever), and it reads a plain
    iterable off the event loop, so a generator producing requests slowly never freezes the trainer's other
    tasks."""
    sample = text_samples(["How was it?"], ["Fine."])

    def slow_source():
        for _ in range(8):
            time.sleep(0.25)  # e.g. waiting for the next rollout
            yield sample

    async def run():
        gaps, last = [], time.monotonic()

        async def heartbeat():
            nonlocal last
            while True:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        beat = asyncio.create_task(heartbeat())
        async with AsyncRewardClient(server.target, timeout_s=60) as client:
            answered = [i async for i, _ in client.stream_scores(slow_source())]
            with pytest.raises(RewardServiceError) as error:
                async for _ in client.stream_scores(slow_source(), timeout_s=0.6):
                    pass
        beat.cancel()
        return answered, max(gaps), error.value.code

    answered, worst_gap, code = asyncio.run(run())
    assert sorted(answered) == list(range(8))
    assert worst_gap < 0.2  # each 0.25 s wait for the next request happened off the loop
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_failover_when_a_replica_is_killed_mid_load(encoder_bundle, tmp_path, reference):
    """Two replicas behind one client (round_robin); one is SIGKILLed while requests are in flight, having
    served its share. Every request still gets exactly its own rewards, from the survivor."""
    replicas = [start_server(encoder_bundle, tmp_path / f"replica{i}.log") for i in range(2)]
    texts = random_texts(random.Random(4), 400)
    requests = [texts[i : i + 8] for i in range(0, len(texts), 8)]
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=0.5)

    answered, killed_after, served_before_kill = [], [], []

    async def run():
        async with AsyncRewardClient([r.target for r in replicas], retry=policy, timeout_s=120) as client:
            gate = asyncio.Semaphore(6)

            async def one(i: int, request):
                async with gate:
                    rewards = await client.score(*zip(*request))
                answered.append(i)
                return i, rewards

            async def killer():
                while len(answered) < len(requests) // 4:
                    await asyncio.sleep(0.01)
                served_before_kill.extend(metrics(r)["rm_samples_total"] for r in replicas)
                replicas[0].process.kill()  # mid-load: calls are in flight on it
                killed_after.append(len(answered))

            *answers, _ = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)), killer())
            return answers

    try:
        answers = asyncio.run(run())
        survivor_total = metrics(replicas[1])["rm_samples_total"]
    finally:
        for r in replicas:
            stop_server(r)
    assert all(served > 0 for served in served_before_kill)  # round_robin: both had traffic
    assert survivor_total - served_before_kill[1] > len(texts) / 2  # the killed one's share went to the survivor
    got = np.concatenate([rewards for _, rewards in answers])
    assert got.shape == (len(texts),)
    np.testing.assert_allclose(got, expected(reference, texts), atol=1e-5)
    assert replicas[0].process.returncode == -9 and len(answered) == len(requests)
    assert killed_after[0] < len(requests) - 6  # most of the load came after the kill


HOSTS = Path("/etc/hosts")


@contextlib.contextmanager
def hosts_entry(name: str):
    """A name in /etc/hosts (what a cluster DNS would serve), set with `point(address)`; restored after."""
    if not os.access(HOSTS, os.W_OK):
        pytest.skip("/etc/hosts is not writable here: a name cannot be moved to another address")
    original = HOSTS.read_text()

    def point(address: str) -> None:
        HOSTS.write_text(original.rstrip("\n") + f"\n{address} {name}\n")

    try:
        yield point
    finally:
        HOSTS.write_text(original)


def test_a_replica_name_is_resolved_again_when_its_pod_comes_back_elsewhere(encoder_bundle, tmp_path):
    """Each replica name is its own dns:/// channel, looked up again when its connection fails, so a
    replica restarted on another address (a rescheduled pod) gets calls again; calls go to the replicas in
    turn."""
    other = start_server(encoder_bundle, tmp_path / "other.log")
    port = free_port()
    with hosts_entry("rm-replica-under-test") as point:
        point("127.0.0.2")
        first = start_server(encoder_bundle, tmp_path / "first.log", host="127.0.0.2", port=port)
        moved = None
        try:
            with RewardClient([f"rm-replica-under-test:{port}", other.target], timeout_s=60) as client:
                for _ in range(8):
                    client.score(["How was it?"], ["Lovely."])
                assert metrics(first)["rm_samples_total"] > 0 and metrics(other)["rm_samples_total"] > 0
                stop_server(first)
                point("127.0.0.3")  # the pod comes back on another address
                moved = start_server(encoder_bundle, tmp_path / "moved.log", host="127.0.0.3", port=port)
                deadline = time.monotonic() + 60
                while metrics(moved)["rm_samples_total"] < 8 and time.monotonic() < deadline:
                    client.score(["How was it?"], ["Lovely."])
                    time.sleep(0.05)
                assert metrics(moved)["rm_samples_total"] >= 8  # found at its new address, taking its turns
        finally:
            for server in (first, moved, other):
                if server is not None:
                    stop_server(server)
