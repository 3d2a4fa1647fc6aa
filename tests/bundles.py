"""Bundle copies made for a test or a benchmark (hashes rewritten, so they still verify)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rm_contract.bundle import hash_files


def large_vocabulary_copy(bundle: Path, out: Path, extra: int = 1_500_000) -> int:
    """A copy of `bundle` whose tokenizer.json has `extra` more vocabulary entries (~40 MB: seconds to parse),
    hashes rewritten; returns the vocabulary size."""
    shutil.copytree(bundle, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    base = len(vocab)
    vocab.update({f"extra{i:07d}": base + i for i in range(extra)})
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    manifest = json.loads((out / "bundle.json").read_text())
    (out / "bundle.json").write_text(json.dumps(manifest | {"files": hash_files(out)}))
    return base + extra
