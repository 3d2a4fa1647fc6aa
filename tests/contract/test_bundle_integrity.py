"""Every file the server opens is inside the bundle and hashed: names that climb out, symbolic links out,
files nobody listed and an empty `files` are all refused before anything is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rm_contract.bundle import MANIFEST, BundleError, hash_files, load_bundle


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
    """Before: a symbolic link to a directory was not walked (its files never hashed nor refused), and every
    file named bundle.json at any depth was skipped as if it were the manifest."""
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
