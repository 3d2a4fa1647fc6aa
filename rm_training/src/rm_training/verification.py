"""The gates every variant passes before a bundle is written, and again under `rm-export --verify-only`.

Per variant: parity with the PyTorch reference, batch invariance, pairwise accuracy on the eval pairs
(int8 may lose at most MAX_INT8_ACCURACY_DROP against fp32), each graph reading its weights from its own
file, and, for a written bundle, the rewards recorded at export. The measurements are rm_training.parity's;
this module decides pass or fail and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rm_contract.bundle import Bundle
from rm_contract.packing import ScoringRule
from rm_contract.recipe import InputRecipe, SampleEncoder
from rm_contract.records import load_groups
from rm_server.runtime.engine import OnnxEngine, open_engine
from rm_training.batching import TokenizedGroup, tokenize_groups
from rm_training.memory import release_freed_memory
from rm_training.model import RewardModel, sample_encoder
from rm_training.onnx_export import external_data_files, variant_packs, weights_file
from rm_training.parity import (
    BATCH_INVARIANCE,
    MAX_INT8_ACCURACY_DROP,
    TOLERANCE,
    VerificationSet,
    check_variant,
    onnx_scorer,
    padding_sides,
    pairwise_accuracy,
    reference_rewards,
    reference_rows,
    torch_scorer,
    verification_samples,
)
from rm_training.step_checks import check_step_variant, reference_step_scores, step_verification_samples


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
    rule: ScoringRule
    """Where each sample's reward is read (what a packed graph is told)."""
    steps: bool = False
    """A process reward model: `vset` holds StepIds and per-step references (rm_training.step_checks)."""


def prepare_checks(model: RewardModel, tokenizer, recipe: InputRecipe, eval_data: str | None) -> Checked:
    encoder = sample_encoder(tokenizer, recipe)
    if model.output_kind == "steps":  # pairwise accuracy does not apply: the steps are checked one by one
        samples = step_verification_samples(encoder)
        vset = VerificationSet(samples, reference_step_scores(model, samples))
        rule = ScoringRule(model.pooling, tokenizer.pad_token_id)
        return Checked(tokenizer.pad_token_id, vset, [], ("right",), encoder, None, rule, steps=True)
    eval_groups = load_groups(eval_data) if eval_data else []
    samples = [s for g in eval_groups for s in g.samples]
    ids = verification_samples(samples, encoder)
    vset = VerificationSet(ids, reference_rewards(model, ids))
    tokenized = tokenize_groups(eval_groups, encoder, desc="tokenize eval") if eval_groups else []
    sides = ("right",) if model.pooling == "cls" else ("right", "left")
    pad_id = tokenizer.pad_token_id
    accuracy = pairwise_accuracy(torch_scorer(model, pad_id), tokenized) if tokenized else None
    return Checked(pad_id, vset, tokenized, sides, encoder, accuracy, ScoringRule(model.pooling, pad_id))


def run_checks(
    checked: Checked,
    variant_paths: dict[str, Path],
    stage: Callable[[str], None] = lambda _: None,
    packing: dict[str, bool] | None = None,
) -> dict:
    """Per variant: parity, batch invariance, accuracy; raises VerificationError listing every failure.
    `stage` is told which variant is being checked (minutes each for a large model's fp16 on a CPU).
    `packing` (a written bundle's record, under --verify-only) says which variants are served packed;
    else `variant_packs` decides."""
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
        stage(f"checking {dtype}: parity, batch invariance" + (", eval accuracy" if checked.eval_groups else ""))
        try:
            engine = OnnxEngine(path, providers, scoring=checked.rule)
            packs = packing[dtype] if packing else variant_packs(dtype, checked.rule.pooling)
            if checked.steps:
                result, alone = check_step_variant(engine, checked.vset, checked.pad_id, packs)
            else:
                result, alone = check_variant(engine, checked.vset, checked.pad_id, checked.sides, packs)
        except Exception as e:  # noqa: BLE001 - e.g. fp16 kernels missing on the CPU provider
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            variants[dtype] = {"verified": False, "reason": reason}
            failures.append(f"{dtype} could not be checked ({reason})")  # unchecked is not shipped
            continue
        report["padding_sides"] = list(padding_sides(engine, checked.sides))
        result["provider"] = engine.providers[0]
        result["packing"] = packs and engine.packed
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


def check_recorded_rewards(bundle: Bundle) -> None:
    """Every variant of a written bundle reproduces the rewards recorded at export (the check the server
    makes at load); VerificationError naming the first that does not."""
    pad_id = bundle.manifest.get("pad_token_id") or 0
    for variant in bundle.variants:
        problem = bundle.reference_mismatch(variant, open_engine(bundle, variant).score, pad_id)
        if problem:
            raise VerificationError(f"verification failed: {problem}")
