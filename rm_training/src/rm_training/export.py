"""Export a reward-model checkpoint to a verified ONNX model bundle (`rm-export`).

    rm-export --model runs/demo/rm --output runs/demo/bundle --dtype fp32,int8 \\
        --eval-data rm_training/data/demo/test.jsonl
    rm-export --verify-only runs/demo/bundle

fp32 is always exported (it is the reference the other variants derive from); `--dtype` adds fp16
(for the CUDA execution provider) and int8 (static quantization calibrated on real samples, for CPU
serving). Every export scores a verification set with PyTorch and ONNX Runtime and fails when a variant
is off (see rm_training.verification); the bundle is only written when every check passes.

Checkpoints of any dtype (bf16, as most reward models ship; fp16; fp32) are exported from fp32 weights,
the reference every variant is checked against. Models whose fp32 weights exceed
`--external-data-over-mb` keep each variant's weights in one file beside its graph (`model.onnx.data`, ...),
listed and hashed in bundle.json like every other file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rm_contract.bundle import VARIANT_FILES, VARIANTS, BundleError, load_bundle
from rm_contract.config_cli import ConfigError, option, parse_config
from rm_contract.recipe import RecipeError, SampleEncoder
from rm_contract.records import DataError, load_groups
from rm_training.manifest import build_manifest, write_manifest
from rm_training.memory import peak_rss_mb, release_freed_memory, to_fp32
from rm_training.model import CheckpointError, load_reward_model, packing_unsupported, sample_encoder
from rm_training.onnx_export import export_graph, int8_fp32_products, make_int8, optimize, save_fp16
from rm_training.progress import Progress
from rm_training.verification import (
    VerificationError,
    check_recorded_rewards,
    check_weights_files,
    prepare_checks,
    run_checks,
)

INLINE_LIMIT_MB = 1536
"""Weights above this always go to external files: a graph holding them inline nears protobuf's 2 GB limit."""


@dataclass(frozen=True)
class ExportArgs:
    """rm-export's flags as given; `plan()` derives what an export does from them."""

    model: str | None = option(
        None, "checkpoint directory: from rm-train, TRL's RewardTrainer, or any seq-cls reward model"
    )
    output: str | None = option(None, "bundle directory to write (replaced if it exists)")
    dtype: str = option("fp32", "variants, comma-separated: fp32 (always), fp16, int8")
    eval_data: str | None = option(None, "preference pairs for the accuracy check (default: rm-train's eval split)")
    calibration_data: str | None = option(None, "samples calibrating int8 (default: rm-train's training data)")
    name: str | None = option(None, "model name served (default: the output directory's name)")
    version: str = option("1", "model version served")
    template: str | None = option(
        None, "input recipe for checkpoints trained elsewhere", choices=("pair", "concat", "chat")
    )
    max_length: int | None = option(None, "maximum length for checkpoints trained elsewhere")
    step_token: str | None = option(
        None,
        "process reward models trained elsewhere (TRL's PRMTrainer): the token ending each step"
        ' (default: TRL\'s "\\n" for decoders, [SEP] for encoders)',
    )
    opset: int = option(17, "ONNX opset")
    external_data_over_mb: float = option(
        1024,
        "models whose fp32 weights exceed this keep each variant's weights in one .data file beside its"
        f" graph; 0 always does; over {INLINE_LIMIT_MB} they always do (protobuf holds at most 2 GB)",
    )
    input_form: str = option(
        "auto",
        "graph input form: packed (several samples per row, no padding computed), padded (one per row), or"
        " auto (packed where the architecture's packed form is proven)",
        choices=("auto", "packed", "padded"),
    )
    verify_only: str | None = option(None, "re-run the checks on an existing bundle", metavar="BUNDLE")
    progress_every_s: float = option(
        30.0, "seconds between progress lines while a stage runs, for logs (0: a line per stage only)"
    )

    def plan(self) -> ExportPlan:
        """The export these flags ask for, every default resolved; ConfigError (exit code 2) for flags that
        make no sense. Not for `--verify-only`, which reads only the bundle and `--eval-data`."""
        if not self.model or not self.output:
            raise ConfigError("--model and --output are required (or --verify-only BUNDLE)")
        if self.external_data_over_mb < 0:
            raise ConfigError("--external-data-over-mb must not be negative")
        if self.progress_every_s < 0:
            raise ConfigError("--progress-every-s must not be negative")
        dtypes = ("fp32", *(d for d in parse_dtypes(self.dtype) if d != "fp32"))
        eval_data = self.eval_data or trained_data(Path(self.model), "eval_data")
        if "int8" in dtypes and not eval_data:
            raise ConfigError("--dtype int8 needs --eval-data: int8 is accepted only if it keeps pairwise accuracy")
        calibration_data = None
        if "int8" in dtypes:
            calibration_data = self.calibration_data or trained_data(Path(self.model), "data") or eval_data
        return ExportPlan(
            checkpoint=self.model,
            output=Path(self.output),
            dtypes=dtypes,
            eval_data=eval_data,
            calibration_data=calibration_data,
            name=self.name or Path(self.output).name,
            version=self.version,
            template=self.template,
            max_length=self.max_length,
            step_token=self.step_token,
            opset=self.opset,
            external_data_over_mb=min(self.external_data_over_mb, INLINE_LIMIT_MB),
            input_form=self.input_form,
        )


@dataclass(frozen=True)
class ExportPlan:
    """One export, derived from ExportArgs right after parsing: plain values, every default resolved."""

    checkpoint: str
    output: Path
    dtypes: tuple[str, ...]
    """fp32 first (the reference every other variant is checked against), then the others asked for."""
    eval_data: str | None
    """--eval-data, else the eval split rm-train recorded for the checkpoint when that file still exists."""
    calibration_data: str | None
    """With int8 only: --calibration-data, else rm-train's training data, else the eval data."""
    name: str
    version: str
    template: str | None
    max_length: int | None
    opset: int
    external_data_over_mb: float
    """Models whose fp32 weights exceed this keep their weights in external files (at most INLINE_LIMIT_MB)."""
    input_form: str = "auto"
    step_token: str | None = None


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_config(ExportArgs, argv, prog="rm-export", description=__doc__)
        plan = None if args.verify_only else args.plan()
        with Progress("rm-export", args.progress_every_s) as progress:
            if plan is None:
                verify_only(args.verify_only, args.eval_data, progress)
            else:
                export(plan, progress)
    except (ConfigError, CheckpointError, DataError, RecipeError) as e:
        print(f"rm-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (BundleError, VerificationError) as e:
        print(f"rm-export: {e}", file=sys.stderr)
        sys.exit(1)


def export(plan: ExportPlan, progress: Progress) -> Path:
    """Export the checkpoint's variants into a staging directory, check them, write bundle.json, and only
    then put the bundle at `plan.output`."""
    started = time.perf_counter()
    progress.stage(f"loading {plan.checkpoint}")
    model, tokenizer, metadata = load_reward_model(plan.checkpoint, plan.template, plan.max_length, plan.step_token)
    if model.output_kind == "steps":
        sample_encoder(tokenizer, metadata.recipe)  # RecipeError (exit code 2) when the step token is not one token
        if "int8" in plan.dtypes:
            raise ConfigError(
                "--dtype int8: a process reward model's int8 would be judged on step accuracy, which rm-export does "
                "not measure yet; export fp32 (and fp16)"
            )
    if metadata.recipe.template == "chat" and metadata.recipe.date is None:
        # A chat recipe without a date (trained elsewhere, or a reward_model.json without one): the day its
        # template renders (strftime_now) is fixed here, as rm-train fixes it when it makes the recipe.
        recipe = dataclasses.replace(metadata.recipe, date=datetime.date.today().isoformat())
        metadata = dataclasses.replace(metadata, recipe=recipe)
    checkpoint_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model = to_fp32(model).eval()  # bf16/fp16 checkpoints: fp32 is the reference graph and the parity baseline
    fp32_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    external = fp32_mb > plan.external_data_over_mb
    if metadata.pooling == "last_non_pad" and tokenizer.pad_token_id == tokenizer.eos_token_id:
        print(
            "rm-export: warning: pad == eos; this checkpoint uses transformers' pooling rule (the last token that"
            " is not pad), which scores the token before a trailing eos, not the eos itself",
            file=sys.stderr,
        )
    packed = input_form(model, plan.input_form)
    if model.output_kind == "steps" and not packed:
        raise ConfigError("a process reward model is exported in the packed form only (its steps are read there)")
    progress.stage("PyTorch reference rewards" + (" and eval accuracy" if plan.eval_data else ""))
    checked = prepare_checks(model, tokenizer, metadata.recipe, plan.eval_data)
    rule = checked.rule if packed else None
    output = plan.output
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        progress.stage("exporting the fp32 graph")
        export_graph(model, Path(tmp) / "raw.onnx", plan.opset, external, packed)
        if "fp16" in plan.dtypes:  # cast in place: half the memory
            progress.stage("exporting the fp16 graph")
            export_graph(model.half(), Path(tmp) / "raw.fp16.onnx", plan.opset, external, packed)
        model.to("meta")  # the PyTorch weights are done with (references and accuracy are computed): free them
        release_freed_memory()
        progress.stage("optimizing the fp32 graph")
        optimization = optimize(Path(tmp) / "raw.onnx", staging / VARIANT_FILES["fp32"], external)
        if "fp16" in plan.dtypes:
            progress.stage("writing the fp16 variant")
            save_fp16(Path(tmp) / "raw.fp16.onnx", staging / VARIANT_FILES["fp16"], external)
        if "int8" in plan.dtypes:
            progress.stage("quantizing to int8")
            calibration = calibration_sequences(plan.calibration_data, checked.encoder)
            keep_fp32 = int8_fp32_products(metadata.pooling)
            make_int8(Path(tmp) / "raw.onnx", staging / VARIANT_FILES["int8"], calibration, external, rule, keep_fp32)
        paths = {d: staging / VARIANT_FILES[d] for d in plan.dtypes}
        weights = {d: check_weights_files(path, external) for d, path in paths.items()}
        report = run_checks(checked, paths, progress.stage)
        progress.stage("writing the bundle")
        tokenizer.save_pretrained(staging)
        make_readable(staging)
        manifest = build_manifest(
            model,
            metadata,
            report,
            name=plan.name,
            model_version=plan.version,
            source_checkpoint=str(Path(plan.checkpoint).resolve()),
            eval_data=plan.eval_data,
            opset=plan.opset,
            optimization=optimization,
            weights_files=weights,
            checkpoint_dtype=checkpoint_dtype,
            seconds=round(time.perf_counter() - started, 1),
            peak_rss_mb=peak_rss_mb(),
            external_data=external,
            input_form="packed" if packed else "padded",
        )
        if checked.encoder.step_id is not None:  # the server reads steps sent as ids and texts at it
            manifest["step_token_id"] = checked.encoder.step_id
            manifest["step_classes"] = model.model.config.num_labels  # 2: TRL's softmax pair; 1: a sigmoid
        manifest = write_manifest(staging, manifest)
        if output.exists():
            shutil.rmtree(output)
        shutil.move(str(staging), str(output))
    print_table(manifest)
    weights_note = "; weights in one .data file per variant" if external else ""
    print(
        f"wrote bundle {output} ({', '.join(plan.dtypes)}{weights_note}) from a {checkpoint_dtype} checkpoint of "
        f"{fp32_mb:,.0f} MiB in fp32, in {manifest['exporter']['seconds']:.0f} s, "
        f"peak RSS {manifest['exporter']['peak_rss_mb']:,.0f} MiB"
    )
    return output


def input_form(model, asked: str) -> bool:
    """Whether to export the packed form: asked for, or `auto` on an architecture whose packed form is
    proven (the others export padded; ConfigError when packed is asked of one)."""
    reason = packing_unsupported(model)
    if asked == "packed" and reason:
        raise ConfigError(f"--input-form packed: {reason}")
    if asked == "auto" and reason:
        print(f"rm-export: exporting the padded form ({reason})", file=sys.stderr)
    return asked != "padded" and reason is None


def verify_only(bundle_dir: str, eval_data: str | None, progress: Progress) -> None:
    """Check hashes and that every variant reproduces its reference rewards; then re-run the full checks
    against the source checkpoint when it is still there. Says what it could not check."""
    progress.stage(f"checking {bundle_dir}'s files and recorded rewards")
    bundle = load_bundle(bundle_dir)  # raises on any sha256 mismatch or missing file
    manifest = bundle.manifest
    check_recorded_rewards(bundle)
    checked = "sha256 of every file, each variant's reference rewards"
    source = Path(manifest["source_checkpoint"])
    if not (source / "config.json").is_file():
        print(f"rm-export: source checkpoint {source} is gone: parity and batch invariance not re-run")
        print(f"bundle {bundle_dir} verified: {checked}")
        return
    progress.stage(f"loading {source}")
    model, tokenizer, _ = load_reward_model(source)
    model = to_fp32(model).eval()
    eval_data = eval_data or manifest.get("eval_data")
    if eval_data and not Path(eval_data).exists():
        eval_data = None
    if "int8" in bundle.variants and not eval_data:
        print("rm-export: no eval data (pass --eval-data): int8's pairwise accuracy against fp32 not re-checked")
    progress.stage("PyTorch reference rewards")
    checked_set = prepare_checks(model, tokenizer, bundle.recipe, eval_data)
    paths = {d: bundle.model_path(d) for d in bundle.variants}
    report = run_checks(checked_set, paths, progress.stage, {d: bundle.packs(d) for d in bundle.variants})
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


def make_readable(directory: Path) -> None:
    """Files 0644, folders 0755: onnx writes weights files owner-only, and the server may run as another user
    (the image's user 10001) on a bundle written by someone else."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def trained_data(checkpoint: Path, split: str) -> str | None:
    """The `data` or `eval_data` file a checkpoint from rm-train used, when it still exists."""
    report = checkpoint / "report.json"
    if report.is_file():
        path = json.loads(report.read_text()).get("config", {}).get(split)
        if path and Path(path).exists():
            return path
    return None


def calibration_sequences(source: str, encoder: SampleEncoder, limit: int = 128) -> list[list[int]]:
    """Responses for int8 calibration: `limit` samples of `source`, shuffled with a fixed seed."""
    groups = load_groups(source)
    samples = [s for g in groups for s in g.samples]
    random.Random(0).shuffle(samples)
    return [encoder.encode(s).ids for s in samples[:limit]]


def parse_dtypes(value: str) -> list[str]:
    dtypes = [d.strip() for d in value.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in VARIANTS]
    if unknown or not dtypes:
        raise ConfigError(f"--dtype takes a comma-separated list of {', '.join(VARIANTS)}")
    return dtypes


if __name__ == "__main__":
    main()
