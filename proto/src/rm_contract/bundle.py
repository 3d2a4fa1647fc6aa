"""The model bundle: the only thing the server loads (docs/bundle.md).

A directory with one ONNX file per variant (fp32, fp16, int8), the tokenizer files, and bundle.json:
the input recipe, pooling rule, limits, normalization statistics, parity report and the sha256 of every
file. Loading checks every hash first, so a corrupted or edited bundle never serves.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tokenizers import Tokenizer

from rm_contract.packing import ScoringRule
from rm_contract.padding import pad_batch
from rm_contract.recipe import InputRecipe, SampleEncoder

FORMAT_VERSION = 2
"""2: graphs take the packed form (rm_contract.packing) unless `input_form` says "padded". Bundles of format 1
(every graph padded) still load and serve, unpacked."""
READABLE_FORMATS = (1, 2)
MANIFEST = "bundle.json"
VARIANTS = ("fp32", "fp16", "int8")
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
"""The ONNX file rm-export writes for each variant (readers follow `variants[NAME].file` in the manifest)."""
REFERENCE_TOLERANCE = {"fp32": 1e-2, "fp16": 2e-2, "int8": 1e-2}
"""How far, relative to the reward scale, a served variant may score the reference samples from what it
scored at export. Loose on purpose: rm-export checked precision; this catches a different graph, and allows
another provider (a GPU's TF32 or true-fp16 arithmetic against the CPU's at export)."""


OUTPUT_KINDS = ("sequence", "steps")
"""What a bundle answers per sample (`output_kind` in bundle.json, "sequence" when absent): one reward, or a
process reward model's P(step correct) at each step token of the recipe (`recipe.step_token`)."""


MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "version": (str, int),
    "pooling": str,
    "max_length": int,
    "recipe": dict,
    "variants": dict,
    "files": dict,
}
"""The fields every reader relies on, with their JSON types (docs/bundle.md lists the rest)."""


TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENIZER_MIB = 64
"""Real tokenizers take 2-35 MiB (Gemma 3's is the largest we know of). tokenizers 0.23 parses the file
without releasing the GIL, so loading a new version pauses every call the process serves for as long
(measured: 2.3 s for a 40 MiB file); this bounds that pause."""


class BundleError(ValueError):
    """The bundle is missing, incomplete, corrupted or of an unknown format."""


def manifest_problems(manifest: dict) -> list[str]:
    """What is wrong with a manifest's fields (missing, mistyped, unreadable recipe, unknown variant)."""
    problems = []
    for key, kind in MANIFEST_FIELDS.items():
        if key not in manifest:
            problems.append(f"'{key}' is missing")
        elif not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            names = kind if isinstance(kind, tuple) else (kind,)
            problems.append(f"'{key}' must be a JSON {' or '.join(t.__name__ for t in names)}")
    if not problems:
        try:
            InputRecipe.from_dict(manifest["recipe"])
        except TypeError as e:
            problems.append(f"'recipe' is not an input recipe ({e})")
        kind = manifest.get("output_kind", "sequence")
        if kind not in OUTPUT_KINDS:
            problems.append(f"unknown output_kind {kind!r} (this version reads {', '.join(OUTPUT_KINDS)})")
        elif (kind == "steps") != (manifest["recipe"].get("template") == "steps"):
            problems.append(f"output_kind {kind!r} with recipe template {manifest['recipe'].get('template')!r}")
        elif kind == "steps" and not (
            manifest.get("input_form") == "packed" and isinstance(manifest.get("step_token_id"), int)
        ):
            problems.append("output_kind 'steps' needs its step_token_id and the packed input form")
        unknown = sorted(set(manifest["variants"]) - set(VARIANTS))
        if unknown:
            problems.append(f"unknown variants {unknown} (expected {', '.join(VARIANTS)})")
        for name, variant in manifest["variants"].items():  # every file a variant loads must be hashed
            for key in ("file", "weights_file"):
                if isinstance(variant, dict) and key in variant and variant[key] not in manifest["files"]:
                    problems.append(f"variant '{name}': {key} {variant[key]!r} is not listed in 'files'")
        problems += reference_problems(manifest)
        if TOKENIZER_FILE not in manifest["files"]:
            problems.append(f"'{TOKENIZER_FILE}' is not listed in 'files'")
        escaping = [name for name in manifest["files"] if escapes(name)]
        problems += [f"file {name!r} is not a plain path inside the bundle" for name in escaping]
    return problems


def reference_problems(manifest: dict) -> list[str]:
    """The reference samples and each variant's export-time rewards on them must be there: the server scores
    them again at load (see `Bundle.reference`)."""
    parity = manifest.get("parity")
    ids = parity.get("reference_ids") if isinstance(parity, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(row, list) and row for row in ids):
        return ["'parity.reference_ids' is missing (bundles from an older rm-export: export again)"]
    return [
        f"variant '{name}': 'reference_rewards' must hold one number per reference sample"
        for name, variant in manifest["variants"].items()
        if not isinstance(variant, dict)
        or not isinstance(variant.get("reference_rewards"), list)
        or len(variant["reference_rewards"]) != len(ids)
        or not all(isinstance(r, (int, float)) for r in variant["reference_rewards"])
    ]


def escapes(name: str) -> bool:
    """Whether a manifest's file name could point outside the bundle (absolute, '..', a drive, empty)."""
    path = PurePosixPath(name)
    return not name or path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SHA256_PREFIX = 12
"""Hex digits of a served model's identity: enough to tell any two bundles apart."""


def served_sha256(directory: Path, variant: str) -> str:
    """The identity of a bundle served as `variant`, in every answer: the first SHA256_PREFIX hex digits of
    the sha256 of bundle.json (which lists every file's sha256: weights, tokenizer, recipe) followed by a
    newline and the variant's name (one bundle holds fp32, fp16 and int8 graphs, whose rewards differ)."""
    digest = hashlib.sha256((directory / MANIFEST).read_bytes() + b"\n" + variant.encode()).hexdigest()
    return digest[:SHA256_PREFIX]


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest, by path relative to the bundle."""
    return {name: sha256_of(directory / name) for name in bundle_file_names(directory)}


def verify_files(directory: Path, expected: dict[str, str]) -> list[str]:
    """Problems with the bundle's files against the manifest's hashes; empty when all match. Every file in
    the directory must be listed (a file nobody hashed could be opened by a graph's external-data
    reference), and every listed one must resolve inside the directory (no symbolic link out of it)."""
    problems = []
    root = directory.resolve()
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif not path.resolve().is_relative_to(root):
            problems.append(f"{name}: resolves outside the bundle (a symbolic link?)")
        elif sha256_of(path) != digest:
            problems.append(f"{name}: sha256 mismatch (file changed or corrupted)")
    unlisted = sorted(set(bundle_file_names(directory)) - set(expected))
    if unlisted:
        problems.append(f"files not listed (so never hashed) in {MANIFEST}: {', '.join(unlisted)}")
    return problems


def bundle_file_names(directory: Path) -> list[str]:
    """Everything in the bundle but its manifest, relative to it: every file, and every symbolic link to a
    directory (listed, never entered: it can never match a hashed file, so such a bundle is refused)."""
    names = []
    for root, dirs, files in os.walk(directory):  # followlinks=False
        base = Path(root)
        entries = [base / f for f in files] + [base / d for d in dirs if (base / d).is_symlink()]
        names += [str(p.relative_to(directory)) for p in entries if p != directory / MANIFEST]
    return sorted(names)


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: dict

    @property
    def recipe(self) -> InputRecipe:
        return InputRecipe.from_dict(self.manifest["recipe"])

    @property
    def variants(self) -> list[str]:
        return list(self.manifest["variants"])

    @property
    def input_form(self) -> str:
        """ "packed" or "padded" (format 1 bundles, and architectures whose packed form is not proven)."""
        return self.manifest.get("input_form", "padded")

    @property
    def output_kind(self) -> str:
        """ "sequence" (one reward per sample) or "steps" (a process reward model: one score per step)."""
        return self.manifest.get("output_kind", "sequence")

    def packs(self, variant: str) -> bool:
        """Whether `variant`'s rows may hold several samples (a packed graph, checked that way at export; a
        decoder's int8 is served one sample per row: rm_training.onnx_export.variant_packs)."""
        packing = self.manifest["variants"][variant].get("packing", True)
        if not isinstance(packing, bool):
            raise BundleError(f"bundle {self.directory}: variants.{variant}.packing must be true or false")
        return self.input_form == "packed" and packing

    def scoring_rule(self) -> ScoringRule:
        """Where each sample's reward is read (the packed form reads it where the server says)."""
        return ScoringRule(self.manifest["pooling"], self.manifest.get("pad_token_id") or 0)

    def model_path(self, variant: str) -> Path:
        if variant not in self.manifest["variants"]:
            raise BundleError(f"bundle {self.directory} has no {variant} variant (it has {', '.join(self.variants)})")
        entry = self.manifest["variants"][variant]
        if entry.get("verified") is not True:  # rm-export writes no such bundle; a hand-edited one is refused
            reason = entry.get("reason", "no 'verified': true in bundle.json")
            raise BundleError(f"bundle {self.directory}: variant {variant} was not verified at export ({reason})")
        return self.directory / entry["file"]

    def reference(self, variant: str) -> tuple[list[list[int]], list[float], float]:
        """The reference samples' ids, the rewards `variant` gave them at export, and how far a served copy
        may differ (absolute): the server scores them at load, so a graph other than the one exported
        (a constant output, a swapped file with a rewritten hash) or a provider computing it wrongly is
        refused instead of served."""
        parity = self.manifest["parity"]
        tolerance = REFERENCE_TOLERANCE[variant] * float(parity.get("reward_scale", 1.0))
        return parity["reference_ids"], self.manifest["variants"][variant]["reference_rewards"], tolerance

    def reference_mismatch(self, variant: str, score: Callable[..., np.ndarray], pad_id: int) -> str | None:
        """Score the reference samples one by one with `score(input_ids, attention_mask) -> rewards` (an
        engine of `variant`) and compare with the rewards recorded at export: None when they agree within the
        tolerance, else what differs. The server runs it at every load, `rm-export --verify-only` too."""
        ids, expected, tolerance = self.reference(variant)
        got = np.concatenate([np.asarray(score(*pad_batch([row], pad_id)), dtype=np.float64) for row in ids])
        worst = float(np.max(np.abs(got - np.asarray(expected, dtype=np.float64))))
        if worst <= tolerance:  # NaN fails
            return None
        return (
            f"the {variant} graph does not reproduce the rewards recorded at export on its {len(ids)} reference "
            f"samples (max difference {worst:.3g} > {tolerance:.3g})"
        )

    def tokenizer_bytes(self) -> bytes:
        """tokenizer.json as it is on disk, refused above MAX_TOKENIZER_MIB before it is read."""
        path = self.directory / TOKENIZER_FILE
        size_mib = path.stat().st_size / 2**20
        if size_mib > MAX_TOKENIZER_MIB:
            raise BundleError(
                f"{path}: {size_mib:.0f} MiB; at most {MAX_TOKENIZER_MIB} MiB are accepted (every tokenizer process "
                "parses it, about 60 ms per MiB, and holds it in memory)"
            )
        return path.read_bytes()

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_buffer(self.tokenizer_bytes())

    def sample_encoder(self) -> SampleEncoder:
        return SampleEncoder(self.tokenizer(), self.recipe)


def load_bundle(directory: str | Path, verify: bool = True) -> Bundle:
    """Read bundle.json and, unless told otherwise, check every file's sha256 against it."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{manifest_path}: invalid JSON ({e.msg})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: not a JSON object")
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise BundleError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}; this version reads "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    problems = manifest_problems(manifest)
    if problems:
        raise BundleError(f"{manifest_path}: " + "; ".join(problems))
    if verify:
        problems = verify_files(directory, manifest["files"])
        if problems:
            raise BundleError(f"bundle {directory} failed verification: " + "; ".join(problems))
    return Bundle(directory, manifest)
