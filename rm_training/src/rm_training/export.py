"""Export a reward-model checkpoint to a verified ONNX model bundle (`rm-export`).

    rm-export --model runs/demo/rm --output runs/demo/bundle --dtype fp32,int8 \\
        --eval-data rm_training/data/demo/test.jsonl
    rm-export --verify-only runs/demo/bundle

fp32 is always exported (it is the reference the other variants derive from); `--dtype` adds fp16
(for the CUDA execution provider) and int8 (static quantization calibrated on real samples, for CPU
serving). Every export scores a verification set with PyTorch and ONNX Runtime and fails when a variant
is off (see rm_training.parity); the bundle is only written when every check passes.

Checkpoints of any dtype (bf16, as most reward models ship; fp16; fp32) are exported from fp32 weights,
the reference every variant is checked against. Models whose fp32 weights exceed
`--external-data-over-mb` keep each variant's weights in one file beside its graph (`model.onnx.data`, ...),
listed and hashed in bundle.json like every other file.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import itertools
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rm_contract.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    VARIANT_FILES,
    VARIANTS,
    BundleError,
    hash_files,
    load_bundle,
)
from rm_contract.recipe import RecipeError, SampleEncoder
from rm_contract.records import DataError, load_groups
from rm_server.engine import OnnxEngine
from rm_training.batching import TokenizedGroup, tokenize_groups
from rm_training.model import CheckpointError, RewardModel, load_reward_model, sample_encoder
from rm_training.onnx_export import (
    export_graph,
    external_data_files,
    make_int8,
    optimize,
    save_fp16,
    weights_file,
)
from rm_training.parity import (
    BATCH_INVARIANCE,
    MAX_INT8_ACCURACY_DROP,
    TOLERANCE,
    VerificationSet,
    check_variant,
    onnx_scorer,
    pairwise_accuracy,
    reference_rewards,
    reference_rows,
    torch_scorer,
    verification_samples,
)

INLINE_LIMIT_MB = 1536
"""Weights above this always go to external files: a graph holding them inline nears protobuf's 2 GB limit."""


class VerificationError(RuntimeError):
    """A variant failed parity, batch invariance or accuracy; the message says which and by how much."""


@dataclass
class Checked:
    """Everything the checks need: the PyTorch reference, the verification set, eval pairs (if any)."""

    pad_id: int
    vset: VerificationSet
    eval_groups: list[TokenizedGroup]
    sides: tuple[str, ...]
    encoder: SampleEncoder
    torch_eval_accuracy: float | None
    """PyTorch's pairwise accuracy on the eval pairs, computed up front so the weights can go before ONNX work."""


def prepare_checks(model: RewardModel, tokenizer, recipe, eval_data: str | None) -> Checked:
    encoder = sample_encoder(tokenizer, recipe)
    eval_groups = load_groups(eval_data) if eval_data else []
    samples = [s for g in eval_groups for s in g.samples]
    ids = verification_samples(samples, encoder)
    vset = VerificationSet(ids, reference_rewards(model, ids))
    tokenized = tokenize_groups(eval_groups, encoder, desc="tokenize eval") if eval_groups else []
    sides = ("right",) if model.pooling == "cls" else ("right", "left")
    pad_id = tokenizer.pad_token_id
    accuracy = pairwise_accuracy(torch_scorer(model, pad_id), tokenized) if tokenized else None
    return Checked(pad_id, vset, tokenized, sides, encoder, accuracy)


def run_checks(checked: Checked, variant_paths: dict[str, Path]) -> dict:
    """Per variant: parity, batch invariance, accuracy; raises VerificationError listing every failure."""
    scale = max(1.0, float(np.std(checked.vset.reference)))
    report: dict = {"reward_scale": scale, "n_samples": len(checked.vset.ids), "padding_sides": list(checked.sides)}
    reference = reference_rows(checked.vset)
    report["reference_ids"] = [checked.vset.ids[i] for i in reference]
    if checked.torch_eval_accuracy is not None:
        report["torch_eval_accuracy"] = checked.torch_eval_accuracy
    failures, variants = [], {}
    for dtype, path in variant_paths.items():
        # fp16 is meant for CUDA; without a GPU it is still checked, on the CPU provider (slowly).
        providers = ("cuda", "cpu") if dtype == "fp16" and torch.cuda.is_available() else ("cpu",)
        engine = None  # a session from a failed check must not live on while the next one is built
        try:
            engine = OnnxEngine(path, providers)
            result, alone = check_variant(engine, checked.vset, checked.pad_id, checked.sides)
        except Exception as e:  # noqa: BLE001 - e.g. fp16 kernels missing on the CPU provider
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            variants[dtype] = {"verified": False, "reason": reason}
            failures.append(f"{dtype} could not be checked ({reason})")  # unchecked is not shipped
            continue
        result["provider"] = engine.providers[0]
        result["reference_rewards"] = [float(alone[i]) for i in reference]
        result["verified"] = True
        if checked.eval_groups:
            result["eval_accuracy"] = pairwise_accuracy(onnx_scorer(engine, checked.pad_id), checked.eval_groups)
        del engine  # one ONNX Runtime session at a time: each holds a copy of the weights
        release_freed_memory()
        limit = TOLERANCE.get(dtype)
        if limit is not None and not result["parity_max_abs_diff"] <= limit * scale:  # NaN fails too
            failures.append(f"{dtype} parity {result['parity_max_abs_diff']:.2e} > {limit * scale:.1e}")
        limit = BATCH_INVARIANCE[dtype]
        if not result["batch_invariance_max_abs_diff"] <= limit * scale:
            failures.append(
                f"{dtype} batch invariance {result['batch_invariance_max_abs_diff']:.2e} > {limit * scale:.1e}"
            )
        variants[dtype] = result
    if "int8" in variants and variants["int8"].get("verified") and checked.eval_groups:
        # One-sided: quantization noise that happens to flip pairs the right way is not a defect.
        drop = variants["fp32"]["eval_accuracy"] - variants["int8"]["eval_accuracy"]
        variants["int8"]["accuracy_change_vs_fp32_points"] = round(-100 * drop, 2)
        if drop > MAX_INT8_ACCURACY_DROP:
            failures.append(
                f"int8 loses {100 * drop:.2f} points of eval accuracy (> {100 * MAX_INT8_ACCURACY_DROP:.0f})"
            )
    report["variants"] = variants
    if failures:
        raise VerificationError("verification failed: " + "; ".join(failures))
    return report


def export(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    dtypes = ["fp32"] + [d for d in parse_dtypes(args.dtype) if d != "fp32"]
    model, tokenizer, metadata = load_reward_model(args.model, args.template, args.max_length)
    if metadata.recipe.template == "chat" and metadata.recipe.date is None:  # trained before recipes kept it
        metadata.recipe = dataclasses.replace(metadata.recipe, date=datetime.date.today().isoformat())
    checkpoint_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model = to_fp32(model).eval()  # bf16/fp16 checkpoints: fp32 is the reference graph and the parity baseline
    fp32_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    external = fp32_mb > min(args.external_data_over_mb, INLINE_LIMIT_MB)
    eval_data = args.eval_data = args.eval_data or trained_data(Path(args.model), "eval_data")
    if "int8" in dtypes and not eval_data:
        raise DataError("--dtype int8 needs --eval-data: int8 is accepted only if it keeps pairwise accuracy")
    if metadata.pooling == "last_non_pad" and tokenizer.pad_token_id == tokenizer.eos_token_id:
        print(
            "rm-export: warning: pad == eos; this checkpoint uses transformers' pooling rule (the last token that"
            " is not pad), which scores the token before a trailing eos, not the eos itself",
            file=sys.stderr,
        )
    output = Path(args.output)
    checked = prepare_checks(model, tokenizer, metadata.recipe, eval_data)
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        export_graph(model, Path(tmp) / "raw.onnx", args.opset, external)
        if "fp16" in dtypes:  # cast in place: half the memory
            export_graph(model.half(), Path(tmp) / "raw.fp16.onnx", args.opset, external)
        model.to("meta")  # the PyTorch weights are done with (references and accuracy are computed): free them
        release_freed_memory()
        optimization = optimize(Path(tmp) / "raw.onnx", staging / VARIANT_FILES["fp32"], external)
        if "fp16" in dtypes:
            save_fp16(Path(tmp) / "raw.fp16.onnx", staging / VARIANT_FILES["fp16"], external)
        if "int8" in dtypes:
            calibration = calibration_sequences(args, checked.encoder)
            make_int8(Path(tmp) / "raw.onnx", staging / VARIANT_FILES["int8"], calibration, external)
        paths = {d: staging / VARIANT_FILES[d] for d in dtypes}
        weights = {d: check_weights_files(path, external) for d, path in paths.items()}
        report = run_checks(checked, paths)
        tokenizer.save_pretrained(staging)
        make_readable(staging)
        manifest = build_manifest(args, model, metadata, report, optimization, eval_data)
        for dtype, name in weights.items():
            if name:
                manifest["variants"][dtype]["weights_file"] = name
        manifest["checkpoint_dtype"] = checkpoint_dtype
        manifest["exporter"] |= {
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": peak_rss_mb(),
            "external_data": external,
        }
        manifest["files"] = hash_files(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / MANIFEST).chmod(0o644)
        if output.exists():
            shutil.rmtree(output)
        shutil.move(str(staging), str(output))
    print_table(manifest)
    weights_note = "; weights in one .data file per variant" if external else ""
    print(
        f"wrote bundle {output} ({', '.join(dtypes)}{weights_note}) from a {checkpoint_dtype} checkpoint of "
        f"{fp32_mb:,.0f} MiB in fp32, in {manifest['exporter']['seconds']:.0f} s, "
        f"peak RSS {manifest['exporter']['peak_rss_mb']:,.0f} MiB"
    )
    return output


def check_weights_files(path: Path, external: bool) -> str | None:
    """The variant's weights file when it has one; VerificationError when its graph reads weights from
    anywhere but that one file beside it, or the file is not there (the bundle would not load)."""
    files = external_data_files(path)
    expected = {weights_file(path)} if external else set()
    if files != expected:
        found, wanted = sorted(files) or "itself", sorted(expected) or "itself"
        raise VerificationError(f"{path.name} reads weights from {found}; expected {wanted}")
    if files and not (path.parent / weights_file(path)).is_file():
        raise VerificationError(f"{path.name}: weights file {weights_file(path)} was not written")
    return weights_file(path) if files else None


def make_readable(directory: Path) -> None:
    """Files 0644, folders 0755: onnx writes weights files owner-only, and the server may run as another user
    (the image's user 10001) on a bundle written by someone else."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def to_fp32(model: RewardModel) -> RewardModel:
    """Cast to fp32 in place, one tensor at a time, handing back each source tensor's file pages as it goes.

    transformers memory-maps a safetensors checkpoint, so a bf16 model's weights are pages of its file, and
    `model.float()` kept every page it had read resident until the last tensor was cast: the bf16 checkpoint
    on top of its fp32 copy (3.4x the checkpoint at the export's peak on a 0.6B model; 2x without).
    """
    maps = private_file_mappings()
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            source = tensor.data
            tensor.data = source.float()
            drop_file_pages(source, maps)
    return model


def private_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of files (how safetensors maps a checkpoint): the only
    memory whose pages `drop_file_pages` touches. A dropped page that is read again comes back from the file,
    so nothing that still reads the checkpoint can see zeros, unlike anonymous memory."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def drop_file_pages(tensor: torch.Tensor, maps: list[tuple[int, int]]) -> None:
    """madvise(MADV_DONTNEED) the whole pages of `tensor` when they lie in a private file mapping."""
    page = resource.getpagesize()
    start = -(-tensor.data_ptr() // page) * page  # whole pages only: a neighbour may share the edge pages
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if tensor.is_contiguous() and end > start and any(lo <= start and end <= hi for lo, hi in maps):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4: MADV_DONTNEED


def release_freed_memory() -> None:
    """Hand the pages of freed weights back to the OS before the next step loads a variant: glibc keeps freed
    tensors' pages in its heap once its mmap threshold has risen, which left 840 MiB of a 0.6B model's freed
    fp16 weights resident under the ONNX Runtime session built next."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back this way
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_manifest(args, model: RewardModel, metadata, report: dict, optimization: str, eval_data) -> dict:
    config = model.model.config
    variants = {}
    for dtype, result in report.pop("variants").items():
        variants[dtype] = {"file": VARIANT_FILES[dtype], "dtype": dtype, **result}
    variants["fp32"]["optimization"] = optimization
    return {
        "format_version": FORMAT_VERSION,
        "name": args.name or Path(args.output).name,
        "version": args.version,
        "source_checkpoint": str(Path(args.model).resolve()),
        "architecture": (config.architectures or [type(model.model).__name__])[0],
        "model_type": config.model_type,
        "pooling": metadata.pooling,
        "segment_sep_id": metadata.segment_sep_id,
        "pad_token_id": model.pad_token_id,
        "padding_side": "right",
        "max_length": metadata.recipe.max_length,
        "truncation": "prompt_left_keep_response_keep_final_token",
        "recipe": metadata.recipe.to_dict(),
        "normalization": vars(metadata.normalization),
        "eval_data": eval_data,
        "eval_accuracy": report.get("torch_eval_accuracy"),
        "parity": report,
        "variants": variants,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exporter": {
            "rewardserve-training": exporter_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "opset": args.opset,
        },
    }


def exporter_version() -> str:
    """rewardserve-training's version, or "source" when it runs from a checkout on PYTHONPATH, not installed
    (as bench/gpu/device.sh runs it on a machine without a registry)."""
    try:
        return version("rewardserve-training")
    except PackageNotFoundError:
        return "source"


def verify_only(bundle_dir: str, eval_data: str | None) -> None:
    """Check hashes and that every variant reproduces its reference rewards; then re-run the full checks
    against the source checkpoint when it is still there. Says what it could not check."""
    bundle = load_bundle(bundle_dir)  # raises on any sha256 mismatch or missing file
    manifest = bundle.manifest
    pad_id = manifest.get("pad_token_id") or 0
    for variant in bundle.variants:
        problem = bundle.reference_mismatch(variant, OnnxEngine(bundle.model_path(variant)).score, pad_id)
        if problem:
            raise VerificationError(f"verification failed: {problem}")
    checked = "sha256 of every file, each variant's reference rewards"
    source = Path(manifest["source_checkpoint"])
    if not (source / "config.json").is_file():
        print(f"rm-export: source checkpoint {source} is gone: parity and batch invariance not re-run")
        print(f"bundle {bundle_dir} verified: {checked}")
        return
    model, tokenizer, _ = load_reward_model(source)
    model = to_fp32(model).eval()
    eval_data = eval_data or manifest.get("eval_data")
    if eval_data and not Path(eval_data).exists():
        eval_data = None
    if "int8" in bundle.variants and not eval_data:
        print("rm-export: no eval data (pass --eval-data): int8's pairwise accuracy against fp32 not re-checked")
    report = run_checks(
        prepare_checks(model, tokenizer, bundle.recipe, eval_data), {d: bundle.model_path(d) for d in bundle.variants}
    )
    print_table({**manifest, "parity": report, "variants": report["variants"]})
    checked += ", parity, batch invariance" + (", int8 accuracy" if "int8" in bundle.variants and eval_data else "")
    print(f"bundle {bundle_dir} verified: {checked}")


def print_table(manifest: dict) -> None:
    print(f"{'variant':8} {'provider':24} {'parity max|diff|':>17} {'batch inv.':>11} {'eval acc.':>10}")
    for dtype, v in manifest["variants"].items():
        accuracy = f"{v['eval_accuracy']:.4f}" if "eval_accuracy" in v else "-"
        print(
            f"{dtype:8} {v['provider']:24} {v['parity_max_abs_diff']:17.2e} "
            f"{v['batch_invariance_max_abs_diff']:11.2e} {accuracy:>10}"
        )
    torch_accuracy = manifest["parity"].get("torch_eval_accuracy")
    if torch_accuracy is not None:
        print(f"{'torch':8} {'(reference)':24} {'':17} {'':11} {torch_accuracy:10.4f}")


def trained_data(checkpoint: Path, split: str) -> str | None:
    """The `data` or `eval_data` file a checkpoint from rm-train used, when it still exists."""
    report = checkpoint / "report.json"
    if report.is_file():
        path = json.loads(report.read_text()).get("config", {}).get(split)
        if path and Path(path).exists():
            return path
    return None


def calibration_sequences(args: argparse.Namespace, encoder: SampleEncoder, limit: int = 128) -> list[list[int]]:
    """Responses for int8 calibration: --calibration-data, else the training data, else the eval data."""
    source = args.calibration_data or trained_data(Path(args.model), "data") or args.eval_data
    groups = load_groups(source)
    samples = [s for g in groups for s in g.samples]
    random.Random(0).shuffle(samples)
    return [encoder.encode(s).ids for s in samples[:limit]]


def parse_dtypes(value: str) -> list[str]:
    dtypes = [d.strip() for d in value.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in VARIANTS]
    if unknown or not dtypes:
        raise argparse.ArgumentTypeError(f"--dtype takes a comma-separated list of {', '.join(VARIANTS)}")
    return dtypes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rm-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="checkpoint directory: from rm-train, TRL's RewardTrainer, or any seq-cls reward model"
    )
    parser.add_argument("--output", help="bundle directory to write (replaced if it exists)")
    parser.add_argument("--dtype", default="fp32", help="variants, comma-separated: fp32 (always), fp16, int8")
    parser.add_argument("--eval-data", help="preference pairs for the accuracy check (default: rm-train's eval split)")
    parser.add_argument("--calibration-data", help="samples calibrating int8 (default: rm-train's training data)")
    parser.add_argument("--name", help="model name served (default: the output directory's name)")
    parser.add_argument("--version", default="1", help="model version served")
    parser.add_argument(
        "--template", choices=["pair", "concat", "chat"], help="input recipe for checkpoints trained elsewhere"
    )
    parser.add_argument("--max-length", type=int, help="maximum length for checkpoints trained elsewhere")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument(
        "--external-data-over-mb",
        type=float,
        default=1024,
        help="models whose fp32 weights exceed this keep each variant's weights in one .data file beside its"
        f" graph; 0 always does; over {INLINE_LIMIT_MB} they always do (protobuf holds at most 2 GB)"
        " (default: 1024)",
    )
    parser.add_argument("--verify-only", metavar="BUNDLE", help="re-run the checks on an existing bundle")
    args = parser.parse_args(argv)
    try:
        if args.verify_only:
            verify_only(args.verify_only, args.eval_data)
            return
        if not args.model or not args.output:
            parser.error("--model and --output are required (or --verify-only BUNDLE)")
        if args.external_data_over_mb < 0:
            parser.error("--external-data-over-mb must not be negative")
        parse_dtypes(args.dtype)
        export(args)
    except (argparse.ArgumentTypeError, CheckpointError, DataError, RecipeError) as e:
        print(f"rm-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (BundleError, VerificationError) as e:
        print(f"rm-export: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
