"""Packed batches (several samples per row, none computing padding) give each sample its reward alone, on
real exported graphs (the trained MiniLM encoder, the tiny Llama decoder); the batcher packs rows within
its budgets; `--no-packing` serves one sample per row; bundles of format 1 (padded graphs) still serve."""

from __future__ import annotations

import asyncio
import json
import random
import shutil

import numpy as np
import pytest
import torch

from rm_client import RewardClient
from rm_contract.bundle import load_bundle
from rm_contract.packing import ScoringRule, pack_batch, pack_rows, shared_prefix_units
from rm_contract.padding import pad_batch
from rm_contract.recipe import Sample
from rm_server.launch import start_server, stop_server
from rm_server.runtime.batcher import Batcher, BatcherConfig
from rm_server.runtime.engine import open_engine
from rm_training.model import load_reward_model
from tests.conftest import random_texts, rm_export
from tests.contract.test_bundle_integrity import edit_manifest
from tests.server.test_service import metrics


def short_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """Samples from 1 to 8 sentences long: several fit one row of the longest."""
    rng = random.Random(seed)
    return [(p, " ".join(r.split(". ")[: rng.randint(1, 8)])) for p, r in random_texts(rng, n)]


def encoded_samples(bundle, n: int, seed: int) -> list[list[int]]:
    encoder = bundle.sample_encoder()
    return [encoder.encode(Sample.from_text(p, r)).ids for p, r in short_texts(n, seed)]


def one_request_per_sample(engine, config: BatcherConfig, sequences: list[list[int]]):
    """Every sample as its own concurrent request through a Batcher: (rewards, the batches' stats)."""

    async def serve():
        stats = []
        batcher = Batcher(engine, config, on_batch=stats.append)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.score([ids]) for ids in sequences))
        finally:
            await batcher.stop()
        return np.array([r.rewards[0] for r in results]), stats

    return asyncio.run(serve())


@pytest.mark.parametrize("which", ["encoder_bundle", "decoder_bundle"])
def test_packed_rows_give_every_sample_its_reward_alone(which, request):
    bundle = load_bundle(request.getfixturevalue(which))
    engine = open_engine(bundle, "fp32")
    assert engine.packed and bundle.input_form == "packed"
    sequences = encoded_samples(bundle, 24, seed=1)
    alone = np.array([engine.score(*pad_batch([ids], 0))[0] for ids in sequences])
    width = 4 * max(len(ids) for ids in sequences)
    batch = pack_batch(sequences, engine.scoring, width=width)
    assert batch.rows < len(sequences) // 2  # rows really are shared
    np.testing.assert_allclose(engine.score_packed(batch), alone, rtol=0, atol=1e-5)
    # the same samples in another order share rows with other neighbours
    order = list(range(len(sequences)))
    random.Random(2).shuffle(order)
    shuffled = engine.score_packed(pack_batch([sequences[i] for i in order], engine.scoring, width=width))
    np.testing.assert_allclose(shuffled, alone[order], rtol=0, atol=1e-5)
    # and PyTorch alone agrees: the graph's mask and positions are the checkpoint's
    model = load_reward_model(bundle.manifest["source_checkpoint"])[0].eval()
    with torch.no_grad():
        torch_alone = [model(torch.tensor([ids]), torch.ones_like(torch.tensor([ids]))).item() for ids in sequences]
    np.testing.assert_allclose(engine.score_packed(batch), torch_alone, rtol=0, atol=1e-4)


def test_rows_are_packed_first_fit_by_decreasing_length():
    assert pack_rows([5, 3, 8, 2, 1]) == [[2], [0, 1], [3, 4]]
    batch = pack_batch([[7, 7, 7], [8], [9, 9]], ScoringRule("last_non_pad", 9))
    assert batch.input_ids.tolist() == [[7, 7, 7], [9, 9, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch.group_ids.tolist() == [[1, 1, 1], [1, 1, 2]]
    # rewards in input order; [9, 9] is all pad: transformers' rule reads its first token
    assert batch.score_positions.tolist() == [2, 5, 3]


def test_the_batcher_fills_rows_tails_and_no_packing_gives_one_sample_per_row(encoder_bundle):
    """Four long samples of different lengths lead a batch; with packing, short samples fill the rest of
    their rows (a row is never made wider than its longest sample); with --no-packing each takes a row."""
    bundle = load_bundle(encoder_bundle)
    engine = open_engine(bundle, "fp32")
    rng = np.random.default_rng(3)
    sequences = [[101, *rng.integers(1000, 2000, n - 2).tolist(), 102] for n in [100, 110, 90, 120] + [8] * 16]
    alone = np.array([engine.score(*pad_batch([ids], 0))[0] for ids in sequences])

    def serve(packing: bool):
        config = BatcherConfig(max_batch_tokens=512, max_batch_size=16, max_delay_ms=20, packing=packing)
        return one_request_per_sample(engine, config, sequences)

    packed, packed_stats = serve(True)
    unpacked, unpacked_stats = serve(False)
    np.testing.assert_allclose(packed, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(unpacked, alone, rtol=0, atol=1e-5)
    assert all(s.padded_tokens <= 512 and s.rows <= 16 for s in packed_stats + unpacked_stats)
    assert [(s.rows, s.padded_tokens) for s in unpacked_stats] == [(4, 480), (16, 128)]
    assert [(s.rows, s.padded_tokens) for s in packed_stats] == [(10, 480), (10, 80)]  # 6 short ones in the tails
    real = [s.real_tokens for s in packed_stats]
    assert sum(real) == sum(map(len, sequences)) == sum(s.real_tokens for s in unpacked_stats)


def group_samples(bundle, prompts: int, responses: int) -> list[list[int]]:
    """GRPO-shaped samples: each prompt with several responses of different lengths."""
    encoder = bundle.sample_encoder()
    texts = short_texts(prompts * responses, seed=7)
    return [
        encoder.encode(Sample.from_text(f"Question {p}: " + texts[p][0] * 3, texts[p * responses + r][1])).ids
        for p in range(prompts)
        for r in range(responses)
    ]


def test_samples_sharing_a_prompt_compute_it_once_and_score_as_alone(decoder_bundle):
    bundle = load_bundle(decoder_bundle)
    engine = open_engine(bundle, "fp32")
    sequences = group_samples(bundle, prompts=3, responses=4)
    alone = np.array([engine.score(*pad_batch([ids], 0))[0] for ids in sequences])
    batch = pack_batch(sequences, engine.scoring, width=4 * max(len(ids) for ids in sequences), share_prefixes=True)
    assert batch.branch_ids.max() >= 4  # four responses on one prompt
    assert batch.real_tokens < 0.7 * sum(len(ids) for ids in sequences)  # the prompts computed once
    np.testing.assert_allclose(engine.score_packed(batch), alone, rtol=0, atol=1e-5)
    model = load_reward_model(bundle.manifest["source_checkpoint"])[0].eval()
    with torch.no_grad():
        torch_alone = [model(torch.tensor([ids]), torch.ones_like(torch.tensor([ids]))).item() for ids in sequences]
    np.testing.assert_allclose(engine.score_packed(batch), torch_alone, rtol=0, atol=1e-4)


def test_a_prompt_shared_across_per_sample_requests_is_computed_once(decoder_bundle):
    """A group's samples sent one per request (as veRL does) meet in the batcher, which finds their prefix."""
    bundle = load_bundle(decoder_bundle)
    engine = open_engine(bundle, "fp32")
    sequences = group_samples(bundle, prompts=2, responses=6)
    alone = np.array([engine.score(*pad_batch([ids], 0))[0] for ids in sequences])

    config = BatcherConfig(max_batch_tokens=4096, max_batch_size=16, max_delay_ms=50)
    rewards, stats = one_request_per_sample(engine, config, sequences)
    np.testing.assert_allclose(rewards, alone, rtol=0, atol=1e-5)
    assert sum(s.real_tokens for s in stats) < 0.7 * sum(len(ids) for ids in sequences)


def test_a_format_1_bundle_of_padded_graphs_still_serves(tiny_decoder_checkpoint, decoder_bundle, tmp_path):
    """Bundles written before packing (format 1, padded graphs) load and serve unpacked, with the rewards
    the packed bundle of the same checkpoint serves."""
    out = tmp_path / "padded"
    args = ("--dtype", "fp32", "--max-length", "128", "--name", "chat", "--input-form", "padded")
    result = rm_export("--model", str(tiny_decoder_checkpoint), "--output", str(out), *args)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["input_form"] == "padded"
    del manifest["input_form"]
    manifest["format_version"] = 1  # as rm-export wrote it before packing
    (out / "bundle.json").write_text(json.dumps(manifest))
    old = load_bundle(out)
    assert old.input_form == "padded" and not open_engine(old, "fp32").packed

    texts = short_texts(12, seed=5)
    packed = load_bundle(decoder_bundle)
    engine = open_engine(packed, "fp32")
    expected = [engine.score(*pad_batch([ids], 0))[0] for ids in encoded_samples(packed, 12, seed=5)]
    server = start_server(out, tmp_path / "server.log")
    try:
        with RewardClient(server.target) as client:
            got = client.score([p for p, _ in texts], [r for _, r in texts])
    finally:
        stop_server(server)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    shutil.rmtree(out)


def serve_one_group(bundle_dir, tmp_path, *flags: str) -> tuple[int, dict]:
    """One GRPO-shaped request (a long prompt, 6 responses) through rm-serve started with `flags`: checks
    that each reward is the sample's alone, returns the group's token count and the server's /metrics."""
    bundle = load_bundle(bundle_dir)
    prompt = "Question: " + short_texts(1, seed=11)[0][0] * 3
    responses = [r for _, r in short_texts(6, seed=12)]
    ids = [bundle.sample_encoder().encode(Sample.from_text(prompt, r)).ids for r in responses]
    engine = open_engine(bundle, "fp32")
    alone = [engine.score(*pad_batch([i], 0))[0] for i in ids]
    server = start_server(bundle_dir, tmp_path / "server.log", *flags)
    try:
        with RewardClient(server.target) as client:
            rewards = client.score([prompt] * len(responses), responses)
        counted = metrics(server)
    finally:
        stop_server(server)
    np.testing.assert_allclose(rewards, alone, rtol=0, atol=1e-5)
    return sum(map(len, ids)), counted


@pytest.mark.parametrize("packing", [True, False])
def test_served_group_counts_its_shared_prompt_and_no_packing_computes_it_per_sample(decoder_bundle, tmp_path, packing):
    """With packing the group's prompt is computed once (the shared tokens are counted on /metrics), with
    --no-packing every sample computes its own; the rewards are the same."""
    tokens, counted = serve_one_group(decoder_bundle, tmp_path, *([] if packing else ["--no-packing"]))
    assert counted["rm_tokens_total"] == tokens
    shared = counted["rm_shared_prefix_tokens_total"]
    assert (shared > 0.3 * tokens) if packing else shared == 0


def test_a_variant_checked_one_sample_per_row_is_served_one_sample_per_row(decoder_bundle, tmp_path):
    """A variant whose bundle.json says `packing: false` (rm-export writes it for a decoder's int8, whose
    roundings move with where a sample starts in its row) is served unpacked: a GRPO group computes its
    prompt per sample, as with --no-packing, and the rewards are each sample's alone."""
    copy = tmp_path / "bundle"
    shutil.copytree(decoder_bundle, copy)
    edit_manifest(copy, lambda manifest: manifest["variants"]["fp32"].update(packing=False))
    assert not load_bundle(copy).packs("fp32") and load_bundle(decoder_bundle).packs("fp32")
    tokens, counted = serve_one_group(copy, tmp_path)
    assert counted["rm_tokens_total"] == tokens and counted["rm_shared_prefix_tokens_total"] == 0


def test_a_prompt_is_shared_only_where_one_wider_row_costs_less():
    """`row_cost`: with attention free a group of long responses shares its prompt; when a token pair costs
    as much as 1/50 of a token, the row holding all responses costs more than the rows it replaces, while
    short responses under a long prompt still share."""
    prompt = list(range(1000, 1100))
    long_answers = [prompt + [10 + i] * 200 for i in range(4)]
    short_answers = [prompt + [8 + i] * 3 for i in range(4)]
    assert [len(u.members) for u in shared_prefix_units(long_answers, 4096)] == [4]
    assert [len(u.members) for u in shared_prefix_units(long_answers, 4096, pair_cost=1 / 50)] == [1, 1, 1, 1]
    assert [len(u.members) for u in shared_prefix_units(short_answers, 4096, pair_cost=1 / 50)] == [4]
    assert [len(u.members) for u in shared_prefix_units(long_answers, 500)] == [2, 2]  # a unit fits a row
