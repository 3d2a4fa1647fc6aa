"""rm-export: encoder, decoder and TRL checkpoints to verified bundles; corrupted bundles and bad checkpoints."""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from datasets import Dataset
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    ViTConfig,
    ViTModel,
)

from rm_client.samples import text_samples
from rm_contract.bundle import BundleError, hash_files, load_bundle
from rm_contract.packing import ScoringRule, pack_batch
from rm_contract.padding import pad_batch
from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import Message, Sample
from rm_server.launch import start_server, stop_server
from rm_server.runtime.engine import OnnxEngine, open_engine
from rm_training import parity
from rm_training.export import INLINE_LIMIT_MB, ExportArgs, ExportPlan
from rm_training.export import main as export_main
from rm_training.model import load_reward_model, sample_encoder
from rm_training.onnx_export import export_graph, external_data_files, int8_fp32_products, make_int8
from rm_training.parity import MAX_BATCH_TOKENS, VerificationSet, check_variant, reference_rewards
from rm_training.train import TrainConfig, train
from rm_training.verification import Checked, VerificationError, check_weights_files, prepare_checks, run_checks
from tests.conftest import rm_export, sentiment_pairs, tiny_llama_config, write_jsonl
from tests.contract.test_bundle_integrity import constant_graph, edit_manifest


def test_encoder_bundle_holds_verified_variants_and_every_field(encoder_bundle):
    manifest = json.loads((encoder_bundle / "bundle.json").read_text())
    assert manifest["name"] == "toy" and manifest["pooling"] == "cls" and manifest["format_version"] == 2
    assert manifest["input_form"] == "packed"
    assert manifest["recipe"]["template"] == "pair" and manifest["max_length"] == 256
    assert {"mean", "std", "size", "description"} <= set(manifest["normalization"])
    fp32, int8 = manifest["variants"]["fp32"], manifest["variants"]["int8"]
    scale = manifest["parity"]["reward_scale"]
    assert fp32["parity_max_abs_diff"] <= 1e-4 * scale
    assert fp32["batch_invariance_max_abs_diff"] <= 1e-5
    assert int8["batch_invariance_max_abs_diff"] <= 1e-5  # static quantization: no per-batch scales
    assert int8["eval_accuracy"] >= fp32["eval_accuracy"] - 0.01
    assert manifest["eval_accuracy"] == pytest.approx(fp32["eval_accuracy"])
    assert set(manifest["files"]) == {"model.onnx", "model.int8.onnx", "tokenizer.json", "tokenizer_config.json"}
    assert manifest["parity"]["n_samples"] >= 40


def test_served_formatting_equals_training_formatting(encoder_bundle, trained_encoder):
    checkpoint, _ = trained_encoder
    _, tokenizer, metadata = load_reward_model(checkpoint)
    training = sample_encoder(tokenizer, metadata.recipe)
    serving = load_bundle(encoder_bundle).sample_encoder()  # what the server builds: tokenizer.json + bundle.json
    samples = [
        Sample.from_text("How was it?", "Great."),
        Sample.from_text("long " * 400, "kept"),
        Sample((Message("system", "Be brief."), Message("user", "Hi")), (Message("assistant", "Hello!"),)),
    ]
    for sample in samples:
        assert serving.encode(sample) == training.encode(sample)


def test_onnx_reward_equals_pytorch_in_mixed_batches(encoder_bundle, trained_encoder):
    checkpoint, _ = trained_encoder
    model, tokenizer, metadata = load_reward_model(checkpoint)
    encoder = sample_encoder(tokenizer, metadata.recipe)
    texts = [
        ("Q", "The food was great."),
        ("How was the trip?", "Awful, never again, the hotel was dreadful."),
        ("", "ok"),
    ]
    ids = [encoder.encode(Sample.from_text(p, r)).ids for p, r in texts]
    engine = open_engine(load_bundle(encoder_bundle), "fp32")
    batched = engine.score(*pad_batch(ids, tokenizer.pad_token_id))
    with torch.no_grad():
        alone = [model(torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long)).item() for i in ids]
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_flags_resolve_into_one_frozen_plan_and_bad_flags_exit_2_before_any_checkpoint_is_read(tmp_path, capsys):
    """fp32 first, --eval-data and the int8 calibration data defaulting to what rm-train recorded, the
    external-data threshold capped at INLINE_LIMIT_MB; the parsed flags stay as given."""
    checkpoint, output = tmp_path / "rm", tmp_path / "out" / "toy"
    checkpoint.mkdir()
    train_file = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(4, seed=0))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", sentiment_pairs(4, seed=1))
    report = {"config": {"data": str(train_file), "eval_data": str(eval_file)}}
    (checkpoint / "report.json").write_text(json.dumps(report))
    args = ExportArgs(model=str(checkpoint), output=str(output), dtype="int8, fp16", external_data_over_mb=4096)
    plan = args.plan()
    assert plan == ExportPlan(
        checkpoint=str(checkpoint),
        output=output,
        dtypes=("fp32", "int8", "fp16"),
        eval_data=str(eval_file),
        calibration_data=str(train_file),
        name="toy",
        version="1",
        template=None,
        max_length=None,
        opset=17,
        external_data_over_mb=INLINE_LIMIT_MB,
    )
    assert args.eval_data is None and args.external_data_over_mb == 4096
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.eval_data = None  # type: ignore[misc]
    given = ExportArgs(model=str(checkpoint), output=str(output), eval_data="mine.jsonl", name="served").plan()
    assert (given.dtypes, given.calibration_data, given.name) == (("fp32",), None, "served")
    assert given.eval_data == "mine.jsonl"

    (checkpoint / "report.json").unlink()
    model = ["--model", str(checkpoint), "--output", str(output)]
    for argv, message in [
        (["--output", str(output)], "--model and --output are required (or --verify-only BUNDLE)"),
        ([*model, "--external-data-over-mb", "-1"], "--external-data-over-mb must not be negative"),
        ([*model, "--dtype", "fp32,bf16"], "--dtype takes a comma-separated list of fp32, fp16, int8"),
        ([*model, "--dtype", " , "], "--dtype takes a comma-separated list of fp32, fp16, int8"),
        ([*model, "--dtype", "int8"], "--dtype int8 needs --eval-data: int8 is accepted only if it keeps pairwise"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            export_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"rm-export: error: {message}"), err
    with pytest.raises(SystemExit) as exit_info:
        export_main([*model, "--template", "chatml"])
    assert exit_info.value.code == 2 and "invalid choice: 'chatml'" in capsys.readouterr().err
    assert not output.exists()


def test_corrupted_bundle_is_detected(encoder_bundle, tmp_path):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(encoder_bundle), str(broken)], check=True)
    data = bytearray((broken / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx: sha256 mismatch"):
        load_bundle(broken)
    result = rm_export("--verify-only", str(broken))
    assert result.returncode == 1
    assert "model.onnx: sha256 mismatch" in result.stderr
    (broken / "tokenizer.json").unlink()
    assert "tokenizer.json: missing" in rm_export("--verify-only", str(broken)).stderr


def edited_copy(bundle: Path, copy: Path, **fields) -> Path:
    """A copy of `bundle` with `fields` of its bundle.json replaced."""
    shutil.copytree(bundle, copy)
    edit_manifest(copy, lambda manifest: manifest.update(fields))
    return copy


def test_verify_only_reruns_the_checks_on_a_good_bundle_and_says_what_it_could_not(encoder_bundle, tmp_path):
    """--verify-only says what it re-checked: without its eval data, it says int8's accuracy check was not
    re-run, and its "verified" line leaves that check out."""
    result = rm_export("--verify-only", str(encoder_bundle))
    assert result.returncode == 0, result.stderr
    checks = "sha256 of every file, each variant's reference rewards, parity, batch invariance"
    assert f"verified: {checks}, int8 accuracy\n" in result.stdout
    copy = edited_copy(encoder_bundle, tmp_path / "bundle", eval_data=str(tmp_path / "gone.jsonl"))
    result = rm_export("--verify-only", str(copy))
    assert result.returncode == 0, result.stderr
    assert "no eval data (pass --eval-data): int8's pairwise accuracy against fp32 not re-checked" in result.stdout
    assert f"verified: {checks}\n" in result.stdout


def test_verify_only_without_the_source_checkpoint_still_checks_every_graph(encoder_bundle, tmp_path):
    """With the source checkpoint gone, every variant must still reproduce the rewards recorded at export:
    hashes alone would pass a swapped graph with its hash rewritten."""
    copy = edited_copy(encoder_bundle, tmp_path / "bundle", source_checkpoint=str(tmp_path / "deleted"))
    result = rm_export("--verify-only", str(copy))
    assert result.returncode == 0, result.stderr
    assert "parity and batch invariance not re-run" in result.stdout
    assert "verified: sha256 of every file, each variant's reference rewards\n" in result.stdout
    constant_graph(copy / "model.int8.onnx", float(np.mean(load_bundle(copy).reference("int8")[1])))
    edit_manifest(copy, lambda manifest: manifest.update(files=hash_files(copy)))
    result = rm_export("--verify-only", str(copy))
    assert result.returncode == 1
    assert "the int8 graph does not reproduce the rewards recorded at export" in result.stderr


def test_int8_accuracy_check_rejects_a_variant_that_loses_accuracy(trained_encoder, tiny_encoder_checkpoint, tmp_path):
    checkpoint, test_file = trained_encoder
    model, tokenizer, metadata = load_reward_model(checkpoint)
    checked: Checked = prepare_checks(model.eval(), tokenizer, metadata.recipe, str(test_file))
    good = rm_export("--model", str(checkpoint), "--output", str(tmp_path / "good"))
    assert good.returncode == 0, good.stderr
    untrained = tmp_path / "untrained"  # an int8 file that scores like an untrained model must be refused
    result = rm_export("--model", str(tiny_encoder_checkpoint), "--output", str(untrained), "--max-length", "256")
    assert result.returncode == 0, result.stderr
    paths = {"fp32": tmp_path / "good" / "model.onnx", "int8": untrained / "model.onnx"}
    with pytest.raises(VerificationError, match="int8 loses .* points of eval accuracy"):
        run_checks(checked, paths)


def test_decoder_bundle_matches_with_left_and_right_padding(tiny_decoder_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(16, seed=2))
    cfg = TrainConfig(
        data=str(data),
        eval_data=str(data),
        output=str(tmp_path / "rm"),
        model=str(tiny_decoder_checkpoint),
        epochs=1,
        batch_size=8,
        max_length=128,
    )
    train(cfg)
    result = rm_export("--model", str(tmp_path / "rm"), "--output", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert manifest["pooling"] == "last_attended" and manifest["recipe"]["template"] == "chat"
    # a packed graph is given every sample unpadded, so one padding side is checked: the other is the same run
    assert manifest["input_form"] == "packed" and manifest["parity"]["padding_sides"] == ["right"]
    assert manifest["variants"]["fp32"]["parity_max_abs_diff"] <= 1e-4 * manifest["parity"]["reward_scale"]
    assert manifest["variants"]["fp32"]["batch_invariance_max_abs_diff"] <= 1e-5
    engine = open_engine(load_bundle(tmp_path / "bundle"), "fp32")
    ids = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    right, left = (engine.score(*pad_batch(ids, 0, side)) for side in ("right", "left"))
    np.testing.assert_array_equal(left, right)


def test_trl_reward_trainer_checkpoint_exports_with_transformers_pooling(tiny_decoder_checkpoint, tmp_path):
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_checkpoint, num_labels=1)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in sentiment_pairs(16, seed=3)]
    args = RewardConfig(
        output_dir=str(tmp_path / "trl-run"),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        bf16=False,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "trl-rm"))
    tokenizer.save_pretrained(tmp_path / "trl-rm")

    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "bundle"
    result = rm_export(
        "--model", str(tmp_path / "trl-rm"), "--output", str(out), "--template", "concat", "--eval-data", str(eval_file)
    )
    assert result.returncode == 0, result.stderr
    assert "pad == eos" in result.stderr  # the two pooling rules diverge for texts ending with eos
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["pooling"] == "last_non_pad" and manifest["recipe"]["append_eos"]

    # What TRL trains on: prompt + response + eos. The bundle must give transformers' own unpadded score.
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "trl-rm").eval()
    engine = open_engine(load_bundle(out), "fp32")
    texts = [rows[0]["prompt"] + rows[0]["chosen"], rows[1]["prompt"] + rows[1]["rejected"] + " And more words."]
    ids = [tokenizer(t + tokenizer.eos_token)["input_ids"] for t in texts]
    with torch.no_grad():
        expected = [hf_model(input_ids=torch.tensor([i])).logits[0, 0].item() for i in ids]
    for side in ("right", "left"):
        np.testing.assert_allclose(engine.score(*pad_batch(ids, tokenizer.pad_token_id, side)), expected, atol=1e-4)


def test_unsupported_checkpoints_get_a_clear_error(tmp_path, smollm2_tokenizer):
    causal = tmp_path / "causal-lm"
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(causal)
    smollm2_tokenizer.save_pretrained(causal)
    result = rm_export("--model", str(causal), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "output labels; a reward model has exactly one" in result.stderr
    result = rm_export("--model", str(tmp_path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "config.json is missing" in result.stderr
    vision = tmp_path / "vision"
    ViTModel(
        ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(vision)
    result = rm_export("--model", str(vision), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "model type 'vit' has no sequence-classification head" in result.stderr
    assert "supported: llama, qwen2, qwen3" in result.stderr
    result = rm_export("--model", str(causal), "--output", str(tmp_path / "out"), "--external-data-over-mb", "-1")
    assert result.returncode == 2 and "--external-data-over-mb must not be negative" in result.stderr
    assert not (tmp_path / "out").exists()


def test_bf16_checkpoint_exports_served_with_one_weights_file_per_variant(tiny_decoder_checkpoint, tmp_path):
    """How real reward models ship (bf16 safetensors), through the path large models take (weights outside the
    graph, forced here on a tiny model): exported, hashed, served, and equal to transformers' own forward."""
    bf16 = tmp_path / "bf16"
    AutoModelForSequenceClassification.from_pretrained(tiny_decoder_checkpoint).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_decoder_checkpoint).save_pretrained(bf16)
    out = tmp_path / "bundle"
    args = ("--dtype", "fp32,fp16", "--max-length", "64", "--external-data-over-mb", "0", "--progress-every-s", "0.05")
    result = rm_export("--model", str(bf16), "--output", str(out), *args)
    assert result.returncode == 0, result.stderr
    # output to a pipe, as to a log: a line per stage, and heartbeats while one runs
    stages = [line for line in result.stderr.splitlines() if line.startswith("rm-export: ")]
    for stage in ("loading", "exporting the fp16 graph", "checking fp16: parity", "writing the bundle"):
        assert any(line.startswith(f"rm-export: {stage}") for line in stages), result.stderr
    assert any(line.startswith("rm-export: still ") for line in stages), result.stderr
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["checkpoint_dtype"] == "bfloat16" and manifest["exporter"]["external_data"] is True
    assert manifest["recipe"]["date"] == datetime.date.today().isoformat()  # what chat templates render, frozen
    for variant, weights in (("fp32", "model.onnx.data"), ("fp16", "model.fp16.onnx.data")):
        assert manifest["variants"][variant]["weights_file"] == weights
        assert external_data_files(out / manifest["variants"][variant]["file"]) == {weights}
        assert weights in manifest["files"]
        assert (out / weights).stat().st_mode & 0o044 == 0o044  # readable by a server running as another user

    # fp16 as transformers runs it under fp16 weights: products in fp16, norm statistics and softmax in fp32
    types = input_types(out / "model.fp16.onnx")
    assert types["MatMul"] == {"FLOAT16"}
    assert types["Pow"] == types["ReduceMean"] == types["Softmax"] == {"FLOAT"}

    # transformers' forward on the same ids, with the fp32 weights the bf16 checkpoint holds
    reference = AutoModelForSequenceClassification.from_pretrained(bf16).float().eval()
    encoder = load_bundle(out).sample_encoder()
    texts = [("How was it?", "Great."), ("Tell me more about the trip.", "It rained all week, sadly."), ("Q", "ok")]
    samples = text_samples(*zip(*texts))
    ids = [encoder.encode(Sample.from_text(p, r)).ids for p, r in texts]
    with torch.no_grad():
        expected = [reference(input_ids=torch.tensor([i])).logits[0, 0].item() for i in ids]
    server = start_server(out, tmp_path / "serve.log")
    try:
        served = server.stub().Score(pb.ScoreRequest(samples=samples), timeout=60)
        alone = [server.stub().Score(pb.ScoreRequest(samples=[s]), timeout=60).results[0].reward for s in samples]
    finally:
        stop_server(server)
    np.testing.assert_allclose([r.reward for r in served.results], expected, atol=1e-4)
    np.testing.assert_allclose([r.reward for r in served.results], alone, atol=1e-5)

    data = bytearray((out / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx.data: sha256 mismatch"):
        load_bundle(out)
    assert rm_export("--verify-only", str(out)).returncode == 1
    (out / "model.fp16.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"model.fp16.onnx.data: missing"):
        load_bundle(out)


def input_types(path: Path) -> dict[str, set[str]]:
    """op type -> the element types of its first input across the graph."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {i.name: i.data_type for i in graph.initializer}
    found: dict[str, set[str]] = {}
    for node in (n for n in graph.node if n.input):
        found.setdefault(node.op_type, set()).add(onnx.TensorProto.DataType.Name(types.get(node.input[0], 0)))
    return found


def test_a_variant_whose_check_cannot_run_fails_the_export_and_is_refused_at_load(tiny_decoder_checkpoint, tmp_path):
    model, tokenizer, metadata = load_reward_model(tiny_decoder_checkpoint, max_length=32)
    checked = prepare_checks(model.eval(), tokenizer, metadata.recipe, None)
    export_graph(model, tmp_path / "model.onnx")
    (tmp_path / "model.fp16.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(VerificationError, match=r"fp16 could not be checked \(.*\)"):
        run_checks(checked, {"fp32": tmp_path / "model.onnx", "fp16": tmp_path / "model.fp16.onnx"})

    bundle = tmp_path / "bundle"
    assert rm_export("--model", str(tiny_decoder_checkpoint), "--output", str(bundle)).returncode == 0
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["variants"]["fp32"] |= {"verified": False, "reason": "no CUDA here"}
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"variant fp32 was not verified at export \(no CUDA here\)"):
        load_bundle(bundle).model_path("fp32")


def test_the_checks_refuse_a_wrong_graph_and_a_batch_dependent_int8(tiny_decoder_checkpoint, tmp_path):
    """The exporter's gates fed graphs that are wrong on purpose: a constant output as fp32, and a dynamically
    quantized int8 (activation scales computed per batch, padding included) that is otherwise close."""
    model, tokenizer, metadata = load_reward_model(tiny_decoder_checkpoint, max_length=32)
    checked = prepare_checks(model.eval(), tokenizer, metadata.recipe, None)
    export_graph(model, tmp_path / "model.onnx")
    constant_graph(tmp_path / "constant.onnx", float(np.mean(checked.vset.reference)))
    with pytest.raises(VerificationError, match=r"fp32 parity \S+ > 1.0e-04"):
        run_checks(checked, {"fp32": tmp_path / "constant.onnx"})
    quantize_dynamic(str(tmp_path / "model.onnx"), str(tmp_path / "dynamic.onnx"), weight_type=QuantType.QInt8)
    with pytest.raises(VerificationError, match=r"int8 batch invariance \S+ > 1.0e-04"):
        run_checks(checked, {"fp32": tmp_path / "model.onnx", "int8": tmp_path / "dynamic.onnx"})
    assert run_checks(checked, {"fp32": tmp_path / "model.onnx"})["variants"]["fp32"]["verified"]


def test_int8_variant_keeps_its_weights_in_its_own_file(tiny_decoder_checkpoint, tmp_path):
    """The external-weights path of static int8 (large models exported for CPU serving)."""
    model, _, _ = load_reward_model(tiny_decoder_checkpoint, max_length=32)
    export_graph(model.eval(), tmp_path / "raw.onnx")
    out = tmp_path / "bundle"
    out.mkdir()
    rule = ScoringRule(model.pooling, 0)
    calibration = [[5, 6, 7, 8, 9], [10, 11, 12]] * 4
    make_int8(tmp_path / "raw.onnx", out / "model.int8.onnx", calibration, external=True, rule=rule)
    assert check_weights_files(out / "model.int8.onnx", external=True) == "model.int8.onnx.data"
    ids = [[5, 6, 7], [8, 9, 10, 11, 12]]
    engine = OnnxEngine(out / "model.int8.onnx", scoring=rule)
    alone = [engine.score(*pad_batch([i], 0))[0] for i in ids]
    np.testing.assert_allclose(engine.score_packed(pack_batch(ids, rule)), alone, atol=1e-5)
    with pytest.raises(VerificationError, match="reads weights from itself; expected"):
        make_int8(tmp_path / "raw.onnx", out / "inline.onnx", [[5, 6, 7]], external=False, rule=rule)
        check_weights_files(out / "inline.onnx", external=True)


def test_a_decoders_int8_keeps_its_output_projections_in_fp32(tiny_decoder_checkpoint, tmp_path, monkeypatch):
    """A decoder's int8 graph quantizes the products that read a normalization's output (q/k/v, gate/up) and
    keeps o_proj and down_proj, whose inputs carry the decoder's massive activations, in fp32 (the accuracy
    this buys is measured on a trained SmolLM2 reward model: DECODER_FP32_PRODUCTS); checked and recorded as
    served one sample per row (`variant_packs`). Encoders quantize every weight product."""
    model, tokenizer, metadata = load_reward_model(tiny_decoder_checkpoint, max_length=32)
    export_graph(model.eval(), tmp_path / "raw.onnx")
    rule = ScoringRule(model.pooling, 0)
    ids = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]] * 4
    keep = int8_fp32_products(model.pooling)
    assert int8_fp32_products("cls") == ()
    make_int8(tmp_path / "raw.onnx", tmp_path / "int8.onnx", ids, external=False, rule=rule, keep_fp32=keep)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    products = {
        n.name.split("/")[-2]
        for n in graph.node
        if n.op_type == "MatMul" and any("DequantizeLinear" in i for i in n.input)
    }
    assert products == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "score"}, products
    # where a sample starts in its row moves a decoder's int8 roundings: checked and served one per row
    packed_checks = []
    measure = parity.packed_rewards
    monkeypatch.setattr(parity, "packed_rewards", lambda *a, **k: packed_checks.append(k) or measure(*a, **k))
    checked = prepare_checks(model, tokenizer, metadata.recipe, None)
    variants = run_checks(checked, {"fp32": tmp_path / "raw.onnx", "int8": tmp_path / "int8.onnx"})["variants"]
    assert (variants["fp32"]["packing"], variants["int8"]["packing"]) == (True, False)
    assert len(packed_checks) == 6  # fp32's: packed and prefix-shared batches of 3, 8 and 16; none for int8


def test_an_uninstalled_checkout_exports(monkeypatch):
    """rm-export run from a checkout on PYTHONPATH (no installed metadata, as on the GPU machine) names its
    version "source" instead of failing after the whole export."""
    import importlib.metadata

    import rm_training.manifest as manifest

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    assert manifest.exporter_version() == importlib.metadata.version("rewardserve-training")
    monkeypatch.setattr(manifest, "version", not_installed)
    assert manifest.exporter_version() == "source"


EXPORT_MEMORY = """
import sys
from pathlib import Path
from rm_training.memory import to_fp32
from rm_training.model import load_reward_model
from rm_training.onnx_export import export_graph

def grown_mib(step):
    status = lambda field: next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith(field))
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM restarts from the current RSS
    before = status("VmRSS")
    result = step()
    print(status("VmHWM") - before)
    return result

model = load_reward_model(sys.argv[1], None, 64)[0]
model = grown_mib(lambda: to_fp32(model).eval())
grown_mib(lambda: export_graph(model, Path(sys.argv[2]), external=True))
"""


def test_export_holds_the_fp32_model_and_no_copy_of_the_weights(smollm2_tokenizer, tmp_path):
    """A real-size model must export within 3x its bf16 checkpoint, and the fp32 model alone is 2x: casting
    held the checkpoint's memory-mapped pages on top (3x), and torch.onnx's shape inference a copy of every
    weight (another 2x)."""
    config = tiny_llama_config(32000, smollm2_tokenizer.pad_token_id, smollm2_tokenizer.eos_token_id)
    config.update(dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=8, num_labels=1))
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    fp32_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20  # 258 MiB
    model.to(torch.bfloat16).save_pretrained(tmp_path / "checkpoint")  # as reward models ship
    smollm2_tokenizer.save_pretrained(tmp_path / "checkpoint")
    del model
    script = [sys.executable, "-c", EXPORT_MEMORY, str(tmp_path / "checkpoint"), str(tmp_path / "raw.onnx")]
    out = subprocess.run(script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cast_mib, trace_mib = (int(line) for line in out.stdout.split())
    assert cast_mib < 1.2 * fp32_mib, f"casting to fp32 grew RSS by {cast_mib} MiB for {fp32_mib:.0f} MiB of fp32"
    assert trace_mib < 0.25 * fp32_mib, f"tracing grew RSS by {trace_mib} MiB for {fp32_mib:.0f} MiB of weights"


def test_checking_batches_are_bounded_in_padded_tokens(tiny_decoder_checkpoint, tmp_path):
    """Sixteen samples of 2,048 tokens in one checking batch held 14 GB of attention scores on a 0.6B model:
    the checks cut their batches at MAX_BATCH_TOKENS padded tokens, and a long sample still shares its batch
    (batch invariance is still checked on it)."""
    model = load_reward_model(str(tiny_decoder_checkpoint), None, 1024)[0].eval()
    export_graph(model, tmp_path / "model.onnx")

    class RecordingEngine(OnnxEngine):
        shapes: list[tuple[int, int]] = []

        def _run(self, inputs, samples):
            self.shapes.append(inputs["input_ids"].shape)
            return super()._run(inputs, samples)

    rng = np.random.default_rng(0)
    lengths = [1000, 900, 800, 700] + [20] * 36
    ids = [rng.integers(5, 1000, n).tolist() for n in lengths]
    engine = RecordingEngine(tmp_path / "model.onnx", scoring=ScoringRule(model.pooling, 0))
    result, _ = check_variant(engine, VerificationSet(ids, reference_rewards(model, ids)), 0, ("right",))
    assert result["parity_max_abs_diff"] < 1e-4 and result["batch_invariance_max_abs_diff"] < 1e-5
    assert max(rows * length for rows, length in engine.shapes) <= MAX_BATCH_TOKENS
    assert any(rows > 1 and length >= 700 for rows, length in engine.shapes)
    assert max(rows for rows, _ in engine.shapes) == 16  # short samples still fill the largest batch size
