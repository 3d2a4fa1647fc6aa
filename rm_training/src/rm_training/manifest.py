"""bundle.json as rm-export writes it: every field from the checkpoint, the export and its checks, then the
sha256 of every file in the bundle. docs/bundle.md documents the fields; rm_contract.bundle reads them.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnxruntime as ort
import torch

from rm_contract.bundle import FORMAT_VERSION, MANIFEST, VARIANT_FILES, hash_files
from rm_training.model import RewardModel, RewardModelMetadata


def build_manifest(
    model: RewardModel,
    metadata: RewardModelMetadata,
    report: dict,
    *,
    name: str,
    model_version: str,
    source_checkpoint: str,
    eval_data: str | None,
    opset: int,
    optimization: str,
    weights_files: dict[str, str | None],
    checkpoint_dtype: str,
    seconds: float,
    peak_rss_mb: float,
    external_data: bool,
    input_form: str,
) -> dict:
    """Every field of bundle.json but `files` (see `write_manifest`). `report` is `run_checks`'s: its
    `variants` become the manifest's, the rest is `parity`. `weights_files`: each variant's external weights
    file, None for a graph that holds its weights."""
    config = model.model.config
    variants = {}
    for dtype, result in report["variants"].items():
        variants[dtype] = {"file": VARIANT_FILES[dtype], "dtype": dtype, **result}
        if dtype == "fp32":
            variants[dtype]["optimization"] = optimization
        if weights_files.get(dtype):
            variants[dtype]["weights_file"] = weights_files[dtype]
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": model_version,
        "source_checkpoint": source_checkpoint,
        "architecture": (config.architectures or [type(model.model).__name__])[0],
        "model_type": config.model_type,
        "input_form": input_form,
        "pooling": metadata.pooling,
        "segment_sep_id": metadata.segment_sep_id,
        "pad_token_id": model.pad_token_id,
        "padding_side": "right",
        "max_length": metadata.recipe.max_length,
        "truncation": "prompt_left_keep_response_keep_final_token",
        "recipe": metadata.recipe.to_dict(),
        "output_kind": metadata.output_kind,
        "normalization": vars(metadata.normalization),
        "eval_data": eval_data,
        "eval_accuracy": report.get("torch_eval_accuracy"),
        "parity": {key: value for key, value in report.items() if key != "variants"},
        "variants": variants,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exporter": {
            "rewardserve-training": exporter_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "opset": opset,
            "seconds": seconds,
            "peak_rss_mb": peak_rss_mb,
            "external_data": external_data,
        },
        "checkpoint_dtype": checkpoint_dtype,
    }


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Write `manifest` with the sha256 of every file in `bundle_dir` as its `files`, readable by all (0644);
    returns what was written. Every other file must be in place and final: bundle.json holds their hashes."""
    written = {**manifest, "files": hash_files(bundle_dir)}
    (bundle_dir / MANIFEST).write_text(json.dumps(written, indent=2) + "\n")
    (bundle_dir / MANIFEST).chmod(0o644)
    return written


def exporter_version() -> str:
    """rewardserve-training's version, or "source" when it runs from a checkout on PYTHONPATH, not installed
    (as bench/gpu/device.sh runs it on a machine without a registry)."""
    try:
        return version("rewardserve-training")
    except PackageNotFoundError:
        return "source"
