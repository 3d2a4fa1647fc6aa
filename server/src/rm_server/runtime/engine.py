"""ONNX Runtime engine: a batch of ids in, one reward per sample out (numpy only, no torch).

Serving runs through IO binding: the input and output buffers are allocated once on the session's device
(GPU memory with CUDA or TensorRT, host memory on CPU), sized for the batcher's largest batch, and every
batch is copied into them and bound by pointer. No batch allocates device memory, and the CPU provider runs
exactly the code a GPU runs, so CI tests the GPU path up to the device itself.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rm_contract.bundle import Bundle
from rm_contract.packing import PACKED_INPUTS, PADDED_INPUTS, PackedBatch, ScoringRule, pack_batch, unpad

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find CUDA and cuDNN installed as pip packages (nvidia-*), as PyTorch ships them."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            preload()
        except Exception as e:  # noqa: BLE001 - the provider's own start-up error says more, later
            log.debug("onnxruntime.preload_dlls failed: %s", e)


@dataclass
class BoundBuffers:
    """Device buffers for the largest batch: each (R, T) input holds `tokens` ids, the per-sample ones
    (score positions) and the rewards `samples` values."""

    tokens: int
    samples: int
    inputs: dict[str, ort.OrtValue]
    staging: dict[str, np.ndarray]
    """Host arrays of the buffers' size: a batch is written into these, then copied in one transfer each."""
    rewards: ort.OrtValue


class OnnxEngine:
    """One ONNX Runtime session over a bundle variant's model file, in either input form: packed
    (rm_contract.packing: `score_packed`, and `score` on padded batches, one sample per row) or padded
    (bundles exported before packing, and architectures that do not pack: `score` only)."""

    def __init__(
        self,
        model_path: str | Path,
        providers: tuple[str, ...] = ("cpu",),
        threads: int = 0,
        scoring: ScoringRule | None = None,
        scores_per_sample: str = "one",
    ):
        """`scores_per_sample`: "one", or "steps" for a process reward model (up to one per token)."""
        wanted = [PROVIDERS.get(p, p) for p in providers]
        if any(p in GPU_PROVIDERS for p in wanted):
            preload_cuda_libraries()
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
        names = tuple(i.name for i in self.session.get_inputs())
        if sorted(names) == sorted(PACKED_INPUTS):
            if scoring is None:
                raise ValueError(f"{model_path}: a packed graph needs the bundle's scoring rule")
            self.inputs: tuple[str, ...] = PACKED_INPUTS
        elif sorted(names) == sorted(PADDED_INPUTS):
            self.inputs = PADDED_INPUTS
        else:
            raise ValueError(f"{model_path}: graph inputs are {names}, expected {PACKED_INPUTS} or {PADDED_INPUTS}")
        self.scoring = scoring
        self.scores_per_sample = scores_per_sample
        (output,) = self.session.get_outputs()
        self.output_name, self.output_dtype = output.name, ONNX_TO_NUMPY.get(output.type, np.float32)
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self.buffers: BoundBuffers | None = None
        self._bound = threading.Lock()  # one batch at a time in the buffers

    @property
    def packed(self) -> bool:
        return self.inputs == PACKED_INPUTS

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def reserve(self, tokens: int, samples: int) -> None:
        """Allocate the bound buffers once: batches up to `samples` samples (rows, padded) and `tokens`
        computed ids run bound (a process reward model's scores: up to one per token)."""
        self.buffers = None  # free the old ones first
        if self.scores_per_sample == "steps":
            samples = max(samples, tokens)
        new = ort.OrtValue.ortvalue_from_shape_and_type
        sizes = {name: samples if name == "score_positions" else tokens for name in self.inputs}
        inputs = {name: new([size], np.int64, self.device, 0) for name, size in sizes.items()}
        rewards = new([samples], self.output_dtype, self.device, 0)
        staging = {name: np.zeros(size, dtype=np.int64) for name, size in sizes.items()}
        self.buffers = BoundBuffers(tokens, samples, inputs, staging, rewards)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) int64 ids and mask (padding on either side) -> (B,) float32 rewards."""
        if self.packed:
            return self.score_packed(pack_batch(unpad(input_ids, attention_mask), self.scoring, packed=False))
        return self._run({"input_ids": input_ids, "attention_mask": attention_mask}, input_ids.shape[0])

    def score_packed(self, batch: PackedBatch) -> np.ndarray:
        """A packed batch -> one float32 score per score position (a reward per sample; a process reward
        model's steps one after another), in the batch's score_positions order."""
        return self._run(batch.inputs(), len(batch.score_positions))

    def _run(self, inputs: dict[str, np.ndarray], samples: int) -> np.ndarray:
        """Bound when the batch fits the reserved buffers; any other shape (offline checks, benchmarks) runs
        through a plain `run`."""
        buffers = self.buffers
        if buffers is None or inputs["input_ids"].size > buffers.tokens or samples > buffers.samples:
            (rewards,) = self.session.run(None, inputs)
            return rewards.astype(np.float32, copy=False)
        with self._bound:
            return self._run_bound(buffers, inputs, samples)

    def _run_bound(self, buffers: BoundBuffers, inputs: dict[str, np.ndarray], samples: int) -> np.ndarray:
        binding = self.session.io_binding()
        for name, batch in inputs.items():
            staging = buffers.staging[name]
            staging[: batch.size] = batch.ravel()
            buffers.inputs[name].update_inplace(staging)  # one host-to-device copy of a fixed size
            binding.bind_input(name, self.device, 0, np.int64, list(batch.shape), buffers.inputs[name].data_ptr())
        binding.bind_output(self.output_name, self.device, 0, self.output_dtype, [samples], buffers.rewards.data_ptr())
        binding.synchronize_inputs()  # the copies have landed before the graph's streams read them
        self.session.run_with_iobinding(binding)
        return buffers.rewards.numpy()[:samples].astype(np.float32)


def open_engine(bundle: Bundle, variant: str, providers: tuple[str, ...] = ("cpu",), threads: int = 0) -> OnnxEngine:
    """An engine over one of the bundle's variants, told the bundle's scoring rule."""
    scores = "steps" if bundle.output_kind == "steps" else "one"
    return OnnxEngine(bundle.model_path(variant), providers, threads, bundle.scoring_rule(), scores)
