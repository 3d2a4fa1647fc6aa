"""ONNX Runtime engine: padded ids in, one reward per row out (numpy only, no torch)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxEngine:
    """One ONNX Runtime session over a bundle variant's model file."""

    def __init__(self, model_path: str | Path, providers: tuple[str, ...] = ("cpu",), threads: int = 0):
        wanted = [PROVIDERS.get(p, p) for p in providers]
        available = set(ort.get_available_providers())
        usable = [p for p in wanted if p in available]
        if len(usable) < len(wanted):
            log.warning(
                "execution providers %s unavailable; using %s", sorted(set(wanted) - available), usable or ["CPU"]
            )
        self.session = ort.InferenceSession(
            str(model_path), sess_options=session_options(threads), providers=usable or ["CPUExecutionProvider"]
        )
        self.providers = self.session.get_providers()
        missing = [p for p in usable if p not in self.providers]
        if missing:  # e.g. onnxruntime-gpu on a host without CUDA libraries: it falls back by itself
            log.warning("execution providers %s failed to start; running on %s", missing, self.providers)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) int64 ids and mask -> (B,) float32 rewards."""
        (rewards,) = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        return rewards.astype(np.float32, copy=False)
