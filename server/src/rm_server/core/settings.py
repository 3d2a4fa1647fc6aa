"""How every bundle version is served: plain runtime values made from rm-serve's flags (main.ServeArgs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rm_contract.bundle import VARIANTS
from rm_contract.config_cli import ConfigError
from rm_server.core.inputs import Limits
from rm_server.runtime.batcher import BatcherConfig


@dataclass(frozen=True)
class ModelSettings:
    variant: str = "fp32"
    providers: tuple[str, ...] = ("cpu",)
    """Execution providers in order of preference: tensorrt, cuda, cpu."""
    threads: int = 0
    """ONNX Runtime intra-op threads (0: one per core)."""
    tokenizer_processes: int = 2
    """Per model version (0: threads of the serving process)."""
    max_samples_per_request: int = 4096
    verify: bool = True
    """Check every bundle file's sha256 before loading."""
    cache_mb: float = 0
    """Exact reward cache per model version, in MiB (0: off)."""
    batching: BatcherConfig = field(default_factory=BatcherConfig)

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"--variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if self.max_samples_per_request < 1:
            raise ConfigError("--max-samples-per-request must be at least 1")
        if self.tokenizer_processes < 0:
            raise ConfigError("--tokenizer-processes must be 0 (threads of the serving process) or more")
        if not 0 <= self.cache_mb < float("inf"):
            raise ConfigError("--cache-mb must be a number of MiB >= 0 (0: no cache)")
        if not self.providers:
            raise ConfigError("--providers must name at least one execution provider: tensorrt, cuda or cpu")
        self.batching.validate()

    @property
    def limits(self) -> Limits:
        # A request larger than the queue could never be admitted, and its RESOURCE_EXHAUSTED would send
        # clients into endless retries: such a request is refused as INVALID_ARGUMENT instead, and
        # GetModelInfo reports the capped limit, so clients split their calls to fit.
        per_request = min(self.max_samples_per_request, self.batching.max_queue)
        return Limits(max_samples_per_request=per_request, max_admitted=self.batching.max_queue)
