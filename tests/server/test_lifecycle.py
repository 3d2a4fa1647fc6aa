"""Server life cycle and limits: start-up failures, overload, deadlines, graceful shutdown, env configuration."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_contract.pb import reward_pb2 as pb
from rm_server.launch import BIN, failed_start, free_port, start_server, stop_server
from tests.bundles import large_vocabulary_copy
from tests.server.test_service import metrics, text

LONG = "It was a long and winding story with many turns and many more words. " * 20


def test_corrupted_bundle_fails_start_up_with_a_clear_message(encoder_bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(encoder_bundle, broken)
    (broken / "tokenizer.json").write_text("{}")
    result = failed_start(broken)
    assert result.returncode == 2
    assert "tokenizer.json: sha256 mismatch" in result.stderr
    missing = failed_start(tmp_path / "nowhere")
    assert missing.returncode == 2 and "bundle.json is missing" in missing.stderr


def test_a_request_bigger_than_the_whole_queue_is_invalid_not_retryable(encoder_bundle, tmp_path):
    """A request larger than the whole queue is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED (a client retries
    that with backoff, endlessly, and it can never fit), even with --max-samples-per-request above
    --max-queue; the per-request limit GetModelInfo reports (the one clients split by) is capped at the
    queue. Filling the queue with several requests still gets RESOURCE_EXHAUSTED at once (test_admission.py)."""
    server = start_server(encoder_bundle, tmp_path / "log", "--max-queue", "8")
    try:
        assert server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10).max_samples_per_request == 8
        with pytest.raises(grpc.RpcError) as error:
            server.stub().Score(pb.ScoreRequest(samples=[text("Q", "fine")] * 9), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request has 9 samples; at most 8 are accepted per request" in error.value.details()
        assert len(server.stub().Score(pb.ScoreRequest(samples=[text("Q", "fine")] * 8)).results) == 8
    finally:
        stop_server(server)


def test_deadline_exceeded_work_is_dropped_and_the_queue_drains(encoder_bundle, tmp_path):
    """Samples already waiting in the batcher when their call's deadline passes leave the queue unscored.
    Token ids (no tokenization to outlast the deadline) and a poller prove they were queued: a 0.3 s
    deadline on text can pass while the request is still being tokenized, and the test would pass with it."""
    server = start_server(encoder_bundle, tmp_path / "log", "--max-batch-size", "4")
    depths: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            depths.append(metrics(server)["rm_queue_depth"])
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    try:
        poller.start()
        ids = pb.Sample(tokens=pb.TokenIds(ids=[101] + [2000 + i % 500 for i in range(200)] + [102]))
        with pytest.raises(grpc.RpcError) as error:
            server.stub().Score(pb.ScoreRequest(samples=[ids] * 4000), timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while metrics(server)["rm_queue_depth"] > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        done.set()
        poller.join(10)
        assert max(depths) > 1000  # the samples were waiting in the batcher when the deadline passed
        assert metrics(server)["rm_queue_depth"] == 0
        assert metrics(server)["rm_samples_total"] < 4000  # the abandoned samples were never scored
        assert len(server.stub().Score(pb.ScoreRequest(samples=[text("Q", "fine")]), timeout=10).results) == 1
    finally:
        done.set()
        stop_server(server)


def test_sigterm_drains_calls_in_flight_and_refuses_new_ones(encoder_bundle, tmp_path):
    """Health turns NOT_SERVING on gRPC and 503 on the HTTP port's /health (vLLM's probe) during the drain."""
    http_port = free_port()
    server = start_server(encoder_bundle, tmp_path / "log", "--max-batch-size", "1", "--http-port", str(http_port))
    http_health = f"http://127.0.0.1:{http_port}/health"
    assert httpx.get(http_health, timeout=10).status_code == 200
    stub = server.stub()
    answers, errors = [], []

    def call():  # one row per batch: each call keeps the engine busy for a while
        try:
            answers.append(len(stub.Score(pb.ScoreRequest(samples=[text("Q", LONG)] * 1000), timeout=120).results))
        except grpc.RpcError as e:
            errors.append(e.code())

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the calls are in the queue or in the engine
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert server.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert httpx.get(http_health, timeout=10).status_code == 503
    with pytest.raises(grpc.RpcError) as refused:
        server.stub().Score(pb.ScoreRequest(samples=[text("Q", "fine")]), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(60)
    assert errors == [] and answers == [1000] * 6
    assert server.process.wait(timeout=60) == 0
    assert "shutting down: draining 6 calls in flight" in server.log() and "stopped" in server.log()


def test_environment_variables_configure_the_server_and_logs_are_json(encoder_bundle, tmp_path):
    env = {"RM_MAX_SAMPLES_PER_REQUEST": "3", "RM_LOG_FORMAT": "json"}
    server = start_server(encoder_bundle, tmp_path / "log", env=env)
    try:
        with pytest.raises(grpc.RpcError) as error:
            server.stub().Score(pb.ScoreRequest(request_id="req-42", samples=[text("Q", "fine")] * 4))
        assert "at most 3 are accepted" in error.value.details()
    finally:
        stop_server(server)
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any("req-42" in e["message"] and "INVALID_ARGUMENT" in e["message"] for e in entries)
    assert any(e["message"].startswith("stopped (samples scored: ") for e in entries)


def test_unavailable_providers_fall_back_to_cpu_with_a_warning(encoder_bundle, tmp_path):
    server = start_server(encoder_bundle, tmp_path / "log", "--providers", "tensorrt,cuda,cpu")
    try:
        assert len(server.stub().Score(pb.ScoreRequest(samples=[text("Q", "fine")])).results) == 1
        if "CUDAExecutionProvider" not in server.log().split("serving")[-1]:  # a CPU-only machine
            fallback = r"WARNING .*execution providers \[.*\] (unavailable; using|failed to start; running on) "
            assert re.search(fallback + r"\[.*'CPUExecutionProvider'\]", server.log()), server.log()[-2000:]
    finally:
        stop_server(server)


def test_sighup_and_sigusr_do_not_kill_the_server(encoder_bundle, tmp_path):
    """SIGHUP, SIGUSR1 and SIGUSR2 are handled: the server goes on serving, where the default action ends the
    process at once, without a drain."""
    server = start_server(encoder_bundle, tmp_path / "log")
    try:
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            server.process.send_signal(sig)
        time.sleep(0.5)
        assert server.process.poll() is None
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        assert "SIGHUP ignored: no model repository" in server.log() and "SIGUSR1 ignored" in server.log()
    finally:
        stop_server(server)


def test_a_second_sigterm_ends_the_drain_at_once(encoder_bundle, tmp_path):
    """A stream left open holds the drain for the whole --grace-s (60 s); a second SIGTERM ends it now."""
    server = start_server(encoder_bundle, tmp_path / "log", "--grace-s", "60")
    never = threading.Event()

    def requests():
        yield pb.ScoreRequest(request_id="open", samples=[text("Q", "fine")])
        never.wait(120)  # the client keeps its stream open

    stream = server.stub().ScoreStream(requests(), timeout=120)
    assert next(stream).request_id == "open"  # the stream is in flight
    server.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert server.process.poll() is None  # draining, for up to 60 s
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
    assert time.monotonic() - started < 15  # measured: well under a second
    never.set()
    assert "SIGTERM again: ending the drain now" in server.log()


def test_http_calls_still_running_after_the_grace_period_do_not_hold_the_exit(encoder_bundle, tmp_path):
    """After --grace-s the server exits even with HTTP calls in flight (aiohttp's own shutdown waited up to 60 s
    more for them: a server under a bulk /classify took 90 s to stop)."""
    http_port = free_port()
    args = ("--grace-s", "1", "--max-batch-size", "1", "--max-queue", "16000", "--http-port", str(http_port))
    server = start_server(encoder_bundle, tmp_path / "log", *args)
    outcomes = []

    def bulk():  # one row per batch: ~10 s of work per call, ~40 s for the four
        try:
            body = {"input": [f"Q {LONG}"] * 4000, "truncate_prompt_tokens": -1}
            outcomes.append(httpx.post(f"http://127.0.0.1:{http_port}/classify", json=body, timeout=120).status_code)
        except httpx.HTTPError as e:
            outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=bulk) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # the calls are being scored
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 10  # the grace (1 s), the quiet period and closing: measured ~2 s
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 4 and 200 not in outcomes  # cut off, not answered


def test_sigterm_during_start_up_abandons_it_and_exits_0(encoder_bundle, tmp_path):
    """SIGTERM while the model loads abandons start-up and exits 0, not -15 (the default action). The port
    answers NOT_SERVING from the first moment; a bundle with a ~40 MB tokenizer keeps start-up busy for
    seconds, and the signal lands in it."""
    bundle = tmp_path / "slow-to-load"
    large_vocabulary_copy(encoder_bundle, bundle)
    port = free_port()
    log_path = tmp_path / "log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [str(BIN / "rm-serve"), "--bundle", str(bundle), "--port", str(port), "--metrics-port", "-1"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            deadline = time.monotonic() + 60
            status = None
            while status is None and time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    time.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # still loading
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
            process.wait(timeout=30)
    assert "stopped during start-up" in log_path.read_text()
