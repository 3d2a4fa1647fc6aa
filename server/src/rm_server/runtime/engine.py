"""ONNX Runtime engine: padded ids in, one reward per row out (numpy only, no torch).

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

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
INPUTS = ("input_ids", "attention_mask")
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
    """Device buffers for the largest batch: ids and mask (tokens,) int64, rewards (rows,)."""

    tokens: int
    rows: int
    inputs: dict[str, ort.OrtValue]
    staging: dict[str, np.ndarray]
    """Host arrays of the buffers' size: a batch is written into these, then copied in one transfer each."""
    rewards: ort.OrtValue


class OnnxEngine:
    """One ONNX Runtime session over a bundle variant's model file."""

    def __init__(self, model_path: str | Path, providers: tuple[str, ...] = ("cpu",), threads: int = 0):
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
        if sorted(names) != sorted(INPUTS):
            raise ValueError(f"{model_path}: graph inputs are {names}, expected {INPUTS}")
        (output,) = self.session.get_outputs()
        self.output_name, self.output_dtype = output.name, ONNX_TO_NUMPY.get(output.type, np.float32)
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self.buffers: BoundBuffers | None = None
        self._bound = threading.Lock()  # one batch at a time in the buffers

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def reserve(self, tokens: int, rows: int) -> None:
        """Allocate the bound buffers once: batches up to `rows` rows and `tokens` padded ids run bound."""
        self.buffers = None  # free the old ones first
        new = ort.OrtValue.ortvalue_from_shape_and_type
        inputs = {name: new([tokens], np.int64, self.device, 0) for name in INPUTS}
        rewards = new([rows], self.output_dtype, self.device, 0)
        staging = {name: np.zeros(tokens, dtype=np.int64) for name in INPUTS}
        self.buffers = BoundBuffers(tokens, rows, inputs, staging, rewards)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) int64 ids and mask -> (B,) float32 rewards. Bound when the batch fits the reserved
        buffers; any other shape (offline checks, benchmarks) runs through a plain `run`."""
        buffers = self.buffers
        rows = input_ids.shape[0]
        if buffers is None or input_ids.size > buffers.tokens or rows > buffers.rows:
            (rewards,) = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
            return rewards.astype(np.float32, copy=False)
        with self._bound:
            return self._run_bound(buffers, input_ids, attention_mask)

    def _run_bound(self, buffers: BoundBuffers, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        rows = input_ids.shape[0]
        binding = self.session.io_binding()
        for name, batch in zip(INPUTS, (input_ids, attention_mask)):
            staging = buffers.staging[name]
            staging[: batch.size] = batch.ravel()
            buffers.inputs[name].update_inplace(staging)  # one host-to-device copy of a fixed size
            binding.bind_input(name, self.device, 0, np.int64, list(batch.shape), buffers.inputs[name].data_ptr())
        binding.bind_output(self.output_name, self.device, 0, self.output_dtype, [rows], buffers.rewards.data_ptr())
        binding.synchronize_inputs()  # the copies have landed before the graph's streams read them
        self.session.run_with_iobinding(binding)
        return buffers.rewards.numpy()[:rows].astype(np.float32)
