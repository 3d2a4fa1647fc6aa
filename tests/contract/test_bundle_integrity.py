"""Every file the server opens is inside the bundle and hashed: names that climb out, symbolic links out,
files nobody listed and an empty `files` are all refused before anything is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from rm_contract.bundle import MANIFEST, BundleError, hash_files, load_bundle
from rm_server.launch import failed_start


@pytest.fixture
def bundle(encoder_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(encoder_bundle, copy)
    return copy


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_the_untouched_copy_loads(bundle):
    assert load_bundle(bundle).variants


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/../../model.onnx", ""])
def test_a_model_file_named_outside_the_bundle_is_refused(bundle, name):
    outside = bundle.parent / "model.onnx"
    shutil.copy(bundle / "model.onnx", outside)

    def point_outside(manifest: dict) -> None:
        manifest["variants"]["fp32"]["file"] = name
        manifest["files"][name] = manifest["files"]["model.onnx"]

    edit_manifest(bundle, point_outside)
    with pytest.raises(BundleError, match="is not a plain path inside the bundle"):
        load_bundle(bundle)


def test_a_symbolic_link_out_of_the_bundle_is_refused(bundle):
    outside = bundle.parent / "elsewhere.onnx"
    (bundle / "model.onnx").rename(outside)
    (bundle / "model.onnx").symlink_to(outside)  # same bytes, same hash: only where it lives differs
    with pytest.raises(BundleError, match="model.onnx: resolves outside the bundle"):
        load_bundle(bundle)


def test_a_file_nobody_listed_is_refused(bundle):
    (bundle / "model.onnx.data").write_bytes(b"weights a graph could reference without any hash")
    with pytest.raises(BundleError, match="files not listed .* model.onnx.data"):
        load_bundle(bundle)


def test_an_empty_file_list_verifies_nothing_and_is_refused(bundle):
    edit_manifest(bundle, lambda manifest: manifest.update(files={}))
    with pytest.raises(BundleError, match="'model.onnx' is not listed in 'files'.*'tokenizer.json' is not listed"):
        load_bundle(bundle)


def test_the_exporters_hash_list_covers_every_file(bundle):
    assert set(hash_files(bundle)) == set(json.loads((bundle / MANIFEST).read_text())["files"])


def test_a_linked_directory_and_a_nested_manifest_are_not_skipped(bundle, tmp_path):
    """A symbolic link to a directory is walked (its files are hashed or refused), and only the top-level
    bundle.json is the manifest: one at any other depth must be listed like any other file."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "weights.bin").write_bytes(b"unhashed")
    (bundle / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="files not listed .* data"):
        load_bundle(bundle)
    (bundle / "data").unlink()
    (bundle / "nested").mkdir()
    (bundle / "nested" / MANIFEST).write_text("{}")
    with pytest.raises(BundleError, match="files not listed .* nested/bundle.json"):
        load_bundle(bundle)


def constant_graph(path: Path, reward: float) -> None:
    """An ONNX graph with the bundle's inputs and output that gives every sample the same reward."""
    h = onnx.helper
    ids = h.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"])
    mask = h.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"])
    out = h.make_tensor_value_info("reward", onnx.TensorProto.FLOAT, ["batch"])
    nodes = [
        h.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
        h.make_node("ReduceSum", ["m", "axes"], ["s"], keepdims=0),
        h.make_node("Mul", ["s", "zero"], ["z"]),
        h.make_node("Add", ["z", "value"], ["reward"]),
    ]
    constants = [
        h.make_tensor("axes", onnx.TensorProto.INT64, [1], [1]),
        h.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0]),
        h.make_tensor("value", onnx.TensorProto.FLOAT, [], [reward]),
    ]
    graph = h.make_graph(nodes, "constant", [ids, mask], [out], constants)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(path))


def test_a_graph_that_does_not_reproduce_the_exported_rewards_is_refused_at_load(bundle, tmp_path):
    """A constant-output graph is refused at load even with its hash rewritten in bundle.json. Hashes prove
    the files are the listed ones; the reference samples prove they compute the model that was exported."""
    reference = load_bundle(bundle).reference("fp32")[1]
    constant_graph(bundle / "model.onnx", float(np.mean(reference)))
    edit_manifest(bundle, lambda manifest: manifest.update(files=hash_files(bundle)))
    assert load_bundle(bundle).model_path("fp32")  # the hashes agree
    result = failed_start(bundle)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the fp32 graph does not reproduce the rewards recorded at export on its 8 reference" in result.stderr


def test_a_tokenizer_too_large_to_parse_without_stalling_is_refused(bundle):
    """Above 64 MiB a tokenizer.json is refused before parsing, naming the limit: each tokenizer process
    parses and holds its own copy, and a 190 MB one froze every call for 36 s when a new version loaded."""
    with open(bundle / "tokenizer.json", "a") as f:
        f.write(" " * (65 * 2**20))  # still valid JSON: size alone decides
    edit_manifest(bundle, lambda manifest: manifest.update(files=hash_files(bundle)))
    with pytest.raises(BundleError, match=r"tokenizer.json: 66 MiB; at most 64 MiB are accepted"):
        load_bundle(bundle).tokenizer()
