"""Faults on real servers: SIGKILL and restart mid-load, an inference failure in one batch, clients that
cancel, vanish or read slowly on streams. Nothing accepted is lost or answered wrongly, and the server
keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from rm_client import AsyncRewardClient, RetryPolicy
from rm_client.samples import text_samples
from rm_contract.bundle import hash_files
from rm_contract.pb import reward_pb2 as pb
from rm_server.launch import free_port, start_server, stop_server
from tests.conftest import random_texts
from tests.server.test_service import metrics


def test_sigkill_and_restart_mid_load(encoder_bundle, tmp_path, reference):
    port = free_port()
    first = start_server(encoder_bundle, tmp_path / "first.log", port=port)
    texts = random_texts(random.Random(6), 480)
    requests = [texts[i : i + 6] for i in range(0, len(texts), 6)]
    answered, restarted = [], {}

    async def run():
        policy = RetryPolicy(max_attempts=40, initial_backoff_s=0.1, max_backoff_s=1.0)
        async with AsyncRewardClient(first.target, retry=policy, timeout_s=180) as client:
            gate = asyncio.Semaphore(6)

            async def one(request):
                async with gate:
                    rewards = await client.score(*zip(*request))
                answered.append(1)
                return rewards

            async def crash_and_restart():
                while len(answered) < len(requests) // 3:
                    await asyncio.sleep(0.01)
                first.process.kill()
                restarted["server"] = await asyncio.to_thread(
                    start_server, encoder_bundle, tmp_path / "2.log", port=port
                )

            *results, _ = await asyncio.gather(*(one(r) for r in requests), crash_and_restart())
            return results

    try:
        results = asyncio.run(run())
    finally:
        for server in (first, restarted.get("server")):
            if server is not None:
                stop_server(server)
    assert first.process.returncode == -9
    np.testing.assert_allclose(np.concatenate(results), [reference(p, r) for p, r in texts], atol=1e-5)


@pytest.fixture
def fragile_bundle(encoder_bundle, tmp_path):
    """The bundle with tokens added to its tokenizer that the model has no embeddings for (with honest
    hashes): a sample using them passes validation and then fails inside ONNX Runtime, in its own batch."""
    bundle = tmp_path / "fragile"
    shutil.copytree(encoder_bundle, bundle)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.add_tokens([f"<beyond-{i}>" for i in range(100)])
    tokenizer.save(str(bundle / "tokenizer.json"))
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["files"]["tokenizer.json"] = hashlib.sha256((bundle / "tokenizer.json").read_bytes()).hexdigest()
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return bundle, tokenizer.get_vocab_size() - 1


def test_an_inference_failure_fails_only_its_batch(fragile_bundle, tmp_path, reference):
    bundle, bad_id = fragile_bundle
    # A batch budget of one max-length sample, so the failing sample (250 tokens) runs in a batch of its own.
    server = start_server(bundle, tmp_path / "serve.log", "--max-batch-tokens", "256")
    try:
        stub = server.stub()
        good = text_samples(["How was the food?"], ["Lovely."])
        bad = pb.ScoreRequest(samples=[pb.Sample(tokens=pb.TokenIds(ids=[101] + [bad_id] * 248 + [102]))])
        futures = [stub.Score.future(bad, timeout=60)] + [
            stub.Score.future(pb.ScoreRequest(samples=good)) for _ in range(8)
        ]
        with pytest.raises(grpc.RpcError) as failed:
            futures[0].result()
        assert failed.value.code() == grpc.StatusCode.INTERNAL and "inference failed" in failed.value.details()
        for future in futures[1:]:  # other requests, in other batches, are answered
            assert future.result().results[0].reward == pytest.approx(
                reference("How was the food?", "Lovely."), abs=1e-5
            )
        assert server.health() == 1  # SERVING
        assert "inference failed on a batch of 1 rows" in server.log()
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def server(encoder_bundle, tmp_path_factory):
    running = start_server(encoder_bundle, tmp_path_factory.mktemp("faults") / "serve.log")
    yield running
    stop_server(running)


def stream_of(n: int, size: int = 8):
    texts = random_texts(random.Random(7), n * size)
    chunks = [texts[i * size : (i + 1) * size] for i in range(n)]
    return [pb.ScoreRequest(request_id=str(i), samples=text_samples(*zip(*chunk))) for i, chunk in enumerate(chunks)]


def wait_for_empty_queue(server, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while metrics(server)["rm_queue_depth"] > 0:
        assert time.monotonic() < deadline, "the queue never drained"
        time.sleep(0.1)


def test_a_client_that_cancels_mid_stream(server):
    """The work of a cancelled stream stops: its requests not yet read are never scored (a stream holds at
    most 64 requests at once, so most of the 200 are not even received)."""
    before = metrics(server)["rm_samples_total"]
    call = server.stub().ScoreStream(iter(stream_of(200)), timeout=120)
    received = [next(call) for _ in range(3)]
    call.cancel()
    assert len(received) == 3
    wait_for_empty_queue(server)
    assert server.health() == 1
    assert metrics(server)["rm_samples_total"] - before < 200 * 8 / 2


def test_a_client_process_that_vanishes_mid_stream(server):
    script = textwrap.dedent(f"""
        import os, grpc
        from tests.server.test_faults import stream_of
        from rm_contract.pb import reward_pb2_grpc
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel("{server.target}"))
        call = stub.ScoreStream(iter(stream_of(300)))
        next(call)
        os._exit(0)  # gone without closing anything
    """)
    before = metrics(server)["rm_samples_total"]
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    wait_for_empty_queue(server)
    assert server.health() == 1
    time.sleep(1)  # anything still running for the vanished client would be counted by now
    assert metrics(server)["rm_samples_total"] - before < 300 * 8 / 2  # its unread requests were dropped


def test_a_slow_stream_reader_does_not_hold_up_others(server, reference):
    """A client sends 150 requests on a stream and reads nothing for a while; another client is served
    meanwhile; then the slow client reads every answer, each its own."""
    requests = stream_of(150)
    call = server.stub().ScoreStream(iter(requests), timeout=300)
    others = []
    worker = threading.Thread(
        target=lambda: others.extend(
            server.stub().Score(pb.ScoreRequest(samples=text_samples(["Hi"], ["Hello!"])), timeout=60)
            for _ in range(20)
        )
    )
    worker.start()
    worker.join(timeout=120)
    assert len(others) == 20  # served while the stream's answers waited unread
    answers = {r.request_id: r for r in call}
    assert sorted(answers, key=int) == [r.request_id for r in requests]
    first = requests[0].samples[0].text
    assert answers["0"].results[0].reward == pytest.approx(reference(first.prompt, first.response), abs=1e-5)


def token_trigger_graph(path: Path, trigger: int, reward_of_flag: list, constants: list) -> None:
    """An ONNX graph whose reward depends only on `flag` (1.0 for samples holding token `trigger`, else 0.0):
    `reward_of_flag` are the nodes from `flag` (and `constants`) to `reward`. The mask is read (times 0) so
    that both inputs are used."""
    h = onnx.helper
    ids = h.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"])
    mask = h.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"])
    out = h.make_tensor_value_info("reward", onnx.TensorProto.FLOAT, ["batch"])
    nodes = [
        h.make_node("Equal", ["input_ids", "trigger"], ["hit"]),
        h.make_node("Cast", ["hit"], ["hit_f"], to=onnx.TensorProto.FLOAT),
        h.make_node("ReduceMax", ["hit_f"], ["flag_only"], axes=[1], keepdims=0),
        h.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
        h.make_node("ReduceSum", ["m", "axes"], ["s"], keepdims=0),
        h.make_node("Mul", ["s", "zero"], ["z"]),
        h.make_node("Add", ["z", "flag_only"], ["flag"]),
        *reward_of_flag,
    ]
    constants = [
        h.make_tensor("axes", onnx.TensorProto.INT64, [1], [1]),
        h.make_tensor("trigger", onnx.TensorProto.INT64, [], [trigger]),
        h.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0]),
        *constants,
    ]
    graph = h.make_graph(nodes, "token_trigger", [ids, mask], [out], constants)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(path))


def nan_on_token_graph(path: Path, reward: float, trigger: int) -> None:
    """Every sample gets `reward`, except -inf (log 0) for samples holding token `trigger`: a model that
    overflows on some inputs only, so it passes the load-time reference check."""
    h = onnx.helper
    nodes = [
        h.make_node("Sub", ["one", "flag"], ["kept"]),
        h.make_node("Log", ["kept"], ["log_kept"]),
        h.make_node("Add", ["log_kept", "value"], ["reward"]),
    ]
    constants = [
        h.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0]),
        h.make_tensor("value", onnx.TensorProto.FLOAT, [], [reward]),
    ]
    token_trigger_graph(path, trigger, nodes, constants)


def step_on_token_graph(path: Path, step: float, trigger: int) -> None:
    """Every sample gets 0.0, except `step` for samples holding token `trigger`."""
    h = onnx.helper
    token_trigger_graph(
        path,
        trigger,
        [h.make_node("Mul", ["flag", "step"], ["reward"])],
        [h.make_tensor("step", onnx.TensorProto.FLOAT, [], [step])],
    )


def bundle_with_graph(source: Path, tmp_path: Path, write_graph, reference_reward: float, trigger: int) -> Path:
    """A copy of `source` whose fp32 graph is written by `write_graph(path)`, giving `reference_reward` on
    the reference samples (none holds `trigger`), with bundle.json's hashes and reference rewards to match."""
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert all(trigger not in ids for ids in manifest["parity"]["reference_ids"])
    write_graph(bundle / manifest["variants"]["fp32"]["file"])
    manifest["variants"]["fp32"]["reference_rewards"] = [reference_reward] * len(manifest["parity"]["reference_ids"])
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    manifest["files"] = hash_files(bundle)
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return bundle


def test_a_non_finite_reward_is_a_failure_not_an_answer(encoder_bundle, tmp_path):
    """A graph that overflows on some inputs (an fp16 variant on long texts) gave NaN or inf as a reward,
    and a trainer would have trained on it. Such a sample fails its request (INTERNAL, naming it); the
    other requests are answered."""
    trigger = 1000
    bundle = bundle_with_graph(
        encoder_bundle, tmp_path, lambda path: nan_on_token_graph(path, 0.5, trigger), 0.5, trigger
    )
    server = start_server(bundle, tmp_path / "serve.log", "--cache-mb", "1")
    try:
        stub = server.stub()
        fine = stub.Score(pb.ScoreRequest(samples=[fine_sample()]), timeout=30)
        assert [r.reward for r in fine.results] == [0.5]
        for _ in range(2):  # the same again, with the cache on
            with pytest.raises(grpc.RpcError) as failed:
                overflow = pb.Sample(tokens=pb.TokenIds(ids=[101, trigger, 102]))
                stub.Score(pb.ScoreRequest(samples=[fine_sample(), overflow]), timeout=30)
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            assert "non-finite reward (-inf) for sample 1" in failed.value.details()
    finally:
        stop_server(server)


def fine_sample() -> pb.Sample:
    return pb.Sample(tokens=pb.TokenIds(ids=[101, 7, 102]))


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone while read
    return found


def tokenizer_workers(server) -> list[int]:
    """The server's tokenizer processes: its forkserver's children."""
    return [worker for child in children(server.process.pid) for worker in children(child)]


def test_dead_tokenizer_processes_are_replaced_and_the_chunks_they_held_sent_again(encoder_bundle, tmp_path, reference):
    """A tokenizer process that dies (killed, out of memory) is replaced at once, and the chunk it held goes
    to another; the other workers and their chunks are untouched."""
    request = pb.ScoreRequest(samples=text_samples(["Q"], ["A short answer."]))
    expected = reference("Q", "A short answer.")
    server = start_server(encoder_bundle, tmp_path / "serve.log", "--tokenizer-processes", "2")
    try:
        stub = server.stub()
        first = tokenizer_workers(server)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)  # idle; the call right after it
        assert stub.Score(request, timeout=30).results[0].reward == pytest.approx(expected, abs=1e-5)
        second = tokenizer_workers(server)
        assert len(second) == 2 and first[0] not in second
        for pid in second:  # both hold a call's chunk when one of them dies
            os.kill(pid, signal.SIGSTOP)
        calls = [stub.Score.future(request, timeout=30) for _ in range(2)]
        time.sleep(0.5)
        os.kill(second[0], signal.SIGKILL)  # its chunk goes to its replacement; the other worker goes on
        os.kill(second[1], signal.SIGCONT)
        assert [c.result().results[0].reward for c in calls] == [pytest.approx(expected, abs=1e-5)] * 2
        third = tokenizer_workers(server)
        assert len(third) == 2 and second[1] in third
    finally:
        stop_server(server)
    assert server.log().count("a tokenizer process died (exit code -9); starting a new one") == 2


def test_tokenizer_processes_stay_out_of_the_servers_way_and_die_with_it(encoder_bundle, tmp_path):
    """The forkserver and tokenizer processes die with a SIGKILLed server (each worker holds both ends of its
    pool's pipes, so a closed pipe cannot tell it the server went); workers do not import the whole server
    (grpc, ONNX Runtime: 96 MB each); and they are outside the server's process group, so a signal to it
    does not reach them."""
    server = start_server(encoder_bundle, tmp_path / "serve.log")
    try:
        below = children(server.process.pid)
        workers = tokenizer_workers(server)
        assert len(workers) == 2
        for pid in workers:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "onnxruntime" not in maps and "cygrpc" not in maps
            assert os.getpgid(pid) != os.getpgid(server.process.pid)
    finally:
        server.process.kill()
        server.process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in below + workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in below + workers if Path(f"/proc/{pid}").exists()]


def test_compare_of_rewards_800_apart_is_a_probability_not_an_overflow(encoder_bundle, tmp_path):
    """P(A preferred) = sigmoid(r_a - r_b) for any finite rewards: with r_b - r_a = 800 it is 0.0 (and 1.0 the
    other way round), never an INTERNAL from math.exp overflowing."""
    tokenizer = Tokenizer.from_file(str(encoder_bundle / "tokenizer.json"))
    trigger = tokenizer.encode("excellent", add_special_tokens=False).ids[0]
    bundle = bundle_with_graph(
        encoder_bundle, tmp_path, lambda path: step_on_token_graph(path, 800.0, trigger), 0.0, trigger
    )
    server = start_server(bundle, tmp_path / "serve.log")
    try:
        stub = server.stub()
        worse = stub.Compare(pb.CompareRequest(prompt="How was it?", response_a="fine", response_b="excellent"))
        assert (worse.reward_a, worse.reward_b, worse.probability_a_preferred) == (0.0, 800.0, 0.0)
        better = stub.Compare(pb.CompareRequest(prompt="How was it?", response_a="excellent", response_b="fine"))
        assert better.probability_a_preferred == 1.0
    finally:
        stop_server(server)
