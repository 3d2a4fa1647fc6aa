"""Free GPU memory, read through NVML (nvidia-ml-py: pure Python, inert without an NVIDIA driver)."""

from __future__ import annotations


def free_gpu_memory(device_id: int = 0) -> int | None:
    """Free bytes on the GPU (NVML, from nvidia-ml-py), or None where no NVIDIA driver answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_id)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: the caller keeps its default
        return None
