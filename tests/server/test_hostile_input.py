"""Hostile input: property-based requests over every field, and raw bytes on every method path. Each gets
an answer or a clear client-side status (never INTERNAL/UNKNOWN), and the server stays healthy."""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rm_contract.pb import reward_pb2 as pb
from rm_server.launch import start_server, stop_server

LIMIT = 64
CLIENT_STATUSES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(encoder_bundle, tmp_path_factory):
    running = start_server(
        encoder_bundle,
        tmp_path_factory.mktemp("hostile") / "serve.log",
        "--max-samples-per-request",
        str(LIMIT),
        "--max-message-mb",
        "1",
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


any_text = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=50),  # control characters
    st.text(alphabet=st.characters(categories=["Mn", "Me", "Cf", "Co", "So"]), max_size=100),  # marks, emoji
    st.builds(lambda c, n: c * n, st.characters(), st.integers(1000, 60_000)),  # long runs
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=10))
messages = st.lists(st.builds(pb.Message, role=roles, content=any_text), max_size=6)
samples = st.one_of(
    st.builds(lambda p, r: pb.Sample(text=pb.TextPair(prompt=p, response=r)), any_text, any_text),
    st.builds(lambda m: pb.Sample(conversation=pb.Conversation(messages=m)), messages),
    st.builds(lambda ids: pb.Sample(tokens=pb.TokenIds(ids=ids)), st.lists(st.integers(0, 2**32 - 1), max_size=600)),
    st.just(pb.Sample()),
)
requests = st.builds(
    pb.ScoreRequest,
    request_id=st.text(max_size=40),
    samples=st.lists(samples, max_size=LIMIT + 2),
    normalize=st.booleans(),
    truncation=st.integers(0, 5),
)


def assert_clear(call) -> object | None:
    """The call's answer, or None when it failed with a client-side status and a message."""
    try:
        return call()
    except grpc.RpcError as error:
        assert error.code() in CLIENT_STATUSES, (error.code(), error.details())
        assert error.details()
        return None


@SETTINGS
@given(request=requests)
def test_any_score_request_gets_rewards_or_a_clear_error(stub, request):
    answer = assert_clear(lambda: stub.Score(request, timeout=60))
    if answer is not None:
        assert len(answer.results) == len(request.samples)
        assert all(math.isfinite(r.reward) for r in answer.results)


@SETTINGS
@given(prompt=any_text, a=any_text, b=any_text, responses=st.lists(any_text, max_size=8))
def test_any_compare_and_rank_request_gets_an_answer_or_a_clear_error(stub, prompt, a, b, responses):
    compared = assert_clear(lambda: stub.Compare(pb.CompareRequest(prompt=prompt, response_a=a, response_b=b)))
    if compared is not None:
        assert 0.0 <= compared.probability_a_preferred <= 1.0
    ranked = assert_clear(lambda: stub.Rank(pb.RankRequest(prompt=prompt, responses=responses)))
    if ranked is not None:
        assert sorted(ranked.order) == list(range(len(responses)))


REQUEST_TYPES = {
    "Score": pb.ScoreRequest,
    "Compare": pb.CompareRequest,
    "Rank": pb.RankRequest,
    "GetModelInfo": pb.GetModelInfoRequest,
}


@SETTINGS
@given(method=st.sampled_from(sorted(REQUEST_TYPES)), body=st.binary(max_size=2000))
def test_raw_bytes_on_unary_method_paths(server, method, body):
    """Bytes that do not parse as the method's request get INVALID_ARGUMENT saying so; bytes that happen to
    parse are a request like any other: an answer or a clear error."""
    try:
        REQUEST_TYPES[method].FromString(body)
        parses = True
    except DecodeError:
        parses = False
    call = server.channel().unary_unary(f"/reward.v1.RewardService/{method}")  # bytes in, bytes out
    try:
        call(body, timeout=30)
        assert parses, "bytes that are not a valid message were answered"
    except grpc.RpcError as error:
        assert error.code() in CLIENT_STATUSES, (error.code(), error.details())
        assert error.details()
        if not parses:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in error.details()


def test_a_malformed_stream_message_ends_the_stream_at_once(server):
    """The stream ends with INVALID_ARGUMENT at once: it does not hang to the client's deadline (forever
    without one), nor hold up shutdown."""
    stream = server.channel().stream_stream("/reward.v1.RewardService/ScoreStream")
    valid = pb.ScoreRequest(request_id="ok", samples=[pb.Sample(text=pb.TextPair(prompt="p", response="r"))])
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as broken:
        list(stream(iter([valid.SerializeToString(), b"\xff\xff\xff\xff\x0f garbage"]), timeout=30))
    assert broken.value.code() == grpc.StatusCode.INVALID_ARGUMENT, broken.value
    assert "not a valid ScoreRequest" in broken.value.details()
    assert time.monotonic() - started < 2  # ends at once (measured ~0.05 s), not at the 30 s deadline


def test_an_oversize_message_is_refused(server):
    oversize = pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="p", response="x" * (2 * 1024 * 1024)))])
    with pytest.raises(grpc.RpcError) as too_big:
        server.stub().Score(oversize, timeout=30)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_server_is_healthy_after_all_of_it(server):
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    answer = server.stub().Score(pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="Hi", response="Hello"))]))
    assert len(answer.results) == 1


def test_client_text_reaches_the_log_bounded_and_escaped_and_refusals_do_not_flood_it(encoder_bundle, tmp_path):
    """Client text (a request id, a model name) is logged cut short and escaped: a 50 MB id makes no 50 MB
    line, and a newline in it forges no line of its own. A burst of refusals is logged as one line."""
    server = start_server(encoder_bundle, tmp_path / "serve.log")  # its own: no earlier refusals in its log
    try:
        refuse_hostile_text(server)
    finally:
        stop_server(server)


def refuse_hostile_text(server) -> None:
    stub = server.stub()
    before = len(server.log())
    forged = "x" * 1_000_000 + "\n2026-01-01 00:00:00 ERROR rm_server forged line"
    for request_id in [forged] + [f"burst-{i}" for i in range(50)]:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(pb.ScoreRequest(request_id=request_id), timeout=30)  # no samples: refused
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        stub.GetModelInfo(pb.GetModelInfoRequest(model="m" * 100_000 + "\nforged"), timeout=30)
    time.sleep(0.5)
    lines = server.log()[before:].splitlines()
    assert not any(line.startswith("2026-01-01") or line.startswith("forged") for line in lines), lines
    assert max(len(line) for line in lines) < 2000
    assert sum("INVALID_ARGUMENT" in line for line in lines) == 1  # 51 refusals, one line for them


def test_idle_metrics_connections_do_not_hold_threads(server):
    """An idle metrics connection is closed after 5 s, so idle clients do not each hold a thread: with a
    thread kept per connection for as long as its client stays idle, 500 idle connections held 516 threads
    (here 20 after 20)."""
    import socket
    import urllib.request

    def threads() -> int:
        return len(list(Path(f"/proc/{server.process.pid}/task").iterdir()))

    baseline = threads()
    idle = []
    for _ in range(20):
        idle.append(socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5))
        time.sleep(0.02)
    try:
        time.sleep(1.0)
        assert threads() >= baseline + 15  # they are held meanwhile (so this test sees the difference)
        time.sleep(7.0)  # past the idle timeout
        assert threads() < baseline + 5
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read()
        assert b"rm_requests" in body  # still scraping
    finally:
        for connection in idle:
            connection.close()
