"""One bundle version's lifecycle: verify and load, start its tokenizer, batcher and scorer, check the
reference samples (the warm-up), count the calls using it, and stop once they have finished."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from rm_contract.bundle import Bundle, BundleError, load_bundle, served_sha256
from rm_server.core.metrics import ServiceMetrics
from rm_server.core.results import ModelIdentity
from rm_server.core.scoring import Scorer
from rm_server.core.settings import ModelSettings
from rm_server.runtime.batcher import PAIR_COST_WIDTH, Batcher, BatcherConfig, gpu_token_budget, measure_pair_cost
from rm_server.runtime.cache import RewardCache
from rm_server.runtime.engine import open_engine
from rm_server.runtime.tokenizer_processes import InProcessTokenizer, RequestTokenizer, TokenizerProcesses

log = logging.getLogger("rm_server")


class ModelVersion:
    """One bundle version with its engine, batcher and scorer; counts the calls using it."""

    def __init__(self, name: str, version: str, bundle: Bundle, settings: ModelSettings, metrics: ServiceMetrics):
        self.name, self.version, self.bundle, self.settings = name, version, bundle, settings
        path = bundle.model_path(settings.variant)
        try:
            self.engine = open_engine(bundle, settings.variant, settings.providers, settings.threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (Fail, InvalidGraph, ...)
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BundleError(f"{path}: ONNX Runtime cannot load it: {first_line[:500]}") from None
        if bundle.output_kind == "steps" and bundle.sample_encoder().step_id != bundle.manifest["step_token_id"]:
            raise BundleError(f"bundle {bundle.directory}: step_token_id is not the id of recipe.step_token")
        self.identity = ModelIdentity(name, version, served_sha256(bundle.directory, settings.variant))
        self.inflight = 0
        self._metrics = metrics

    @classmethod
    async def load(
        cls, name: str, version: str, directory: Path, settings: ModelSettings, metrics: ServiceMetrics
    ) -> ModelVersion:
        """Verify and create the session (in a thread: it takes seconds, and a hot reload must not stall the
        calls being served), start the tokenizer processes and batching, warm up."""

        def build() -> ModelVersion:
            return cls(name, version, load_bundle(directory, verify=settings.verify), settings, metrics)

        model = await asyncio.to_thread(build)
        try:
            await model.start()
        except BaseException:  # a failed warm-up leaves no batcher task, thread pool or session behind
            await model.stop(grace_s=0)
            raise
        return model

    async def start(self) -> None:
        config = await asyncio.to_thread(self.batcher_config)
        self.engine.reserve(config.max_batch_tokens, config.max_batch_size)
        self.tokenizer = await asyncio.to_thread(self._start_tokenizer)
        self.batcher = Batcher(self.engine, config, on_batch=self._metrics.record_batch)
        settings = self.settings
        cache = RewardCache(int(settings.cache_mb * 2**20), self._metrics.cache_lookups) if settings.cache_mb else None
        self.scorer = Scorer(self.bundle, self.tokenizer, settings.variant, self.batcher, settings.limits, cache)
        self.batcher.start()
        await asyncio.to_thread(self._check_reference, config.pad_id)

    def batcher_config(self) -> BatcherConfig:
        """The batching settings with the token budget resolved for this model and device (sized from free
        memory on a GPU when no budget was given)."""
        max_length = self.bundle.recipe.max_length
        try:
            config = self.settings.batching.resolved(
                max_length, self.engine.on_gpu, self.bundle.manifest.get("pad_token_id") or 0
            )
        except ValueError as e:
            raise BundleError(str(e)) from None
        if self.engine.on_gpu and not self.settings.batching.max_batch_tokens:
            budget = gpu_token_budget(self.engine, config, max_length, self.name)
            config = dataclasses.replace(config, max_batch_tokens=budget)
        if config.packing and self.engine.packed and not self.bundle.packs(self.settings.variant):
            log.info("%s: variant %s was checked one sample per row: served unpacked", self.name, self.settings.variant)
            config = dataclasses.replace(config, packing=False)
        if config.pair_cost is None and self.engine.packed and config.packing and self.engine.scoring.shares_prefixes:
            width = min(config.max_batch_tokens, 4 * max_length, PAIR_COST_WIDTH)
            config = dataclasses.replace(config, pair_cost=measure_pair_cost(self.engine, width))
            log.info("%s: attention costs %.2e of a token per token pair (shared prompts)", self.name, config.pair_cost)
        return config

    def _start_tokenizer(self) -> RequestTokenizer:
        if self.settings.tokenizer_processes:
            return TokenizerProcesses(self.bundle, self.settings.tokenizer_processes, self.settings.verify)
        return InProcessTokenizer(self.bundle)

    def _check_reference(self, pad_id: int) -> None:
        """Score the bundle's reference samples one by one and compare with what this variant scored at
        export: a hash proves the files are the ones listed, this proves they compute the model. It is the
        warm-up too: lengths from short to the maximum run once, so the first call pays no start-up cost."""
        problem = self.bundle.reference_mismatch(self.settings.variant, self.engine.score, pad_id)
        if problem:
            raise BundleError(
                f"bundle {self.bundle.directory}: {problem}, {self.engine.providers[0]}: not the graph that was "
                "exported, or a provider computing it wrongly"
            )

    async def stop(self, grace_s: float = 60.0) -> None:
        """Wait (bounded) for the calls that started on this version, then free the engine."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if hasattr(self, "batcher"):
            await self.batcher.stop()
        if hasattr(self, "scorer"):
            self.scorer.close()
        if hasattr(self, "tokenizer"):
            self.tokenizer.close()
        for part in ("engine", "batcher", "scorer", "tokenizer"):
            self.__dict__.pop(part, None)
