"""The models a server holds: bundle versions (each with its own engine, batcher and scorer), ensembles of
them, and the model repository they are loaded from and swapped in without stopping traffic.

Repository layout (`--model-repo DIR`): `DIR/NAME/VERSION/` is a bundle; `DIR/NAME/ensemble.json`
(`{"members": ["a", "b"]}`) defines an ensemble of other models. Version directories are numbers, ordered
numerically; other names and versions resolving outside the repository are rejected. Policy `latest`
serves each model's newest version that loads and verifies; `pinned` serves the versions named by
`--pin NAME=VERSION`. A new version is loaded and warmed up before it takes traffic, the switch is one
dictionary assignment on the event loop (atomic for every request), and a replaced version is unloaded
once the calls that started on it have finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rm_contract.bundle import SHA256_PREFIX, VARIANTS, Bundle, BundleError, load_bundle, served_sha256
from rm_contract.config_cli import ConfigError, option
from rm_contract.padding import pad_batch
from rm_server.batcher import Batcher, BatcherConfig, BatchingOptions, budget_from_memory
from rm_server.cache import RewardCache
from rm_server.engine import OnnxEngine, free_gpu_memory
from rm_server.errors import InvalidRequest, ModelNotFound
from rm_server.logsafe import loggable
from rm_server.metrics import ServiceMetrics
from rm_server.scoring import Limits, SampleInput, Scorer
from rm_server.tokenizer_processes import InProcessTokenizer, RequestTokenizer, TokenizerProcesses

log = logging.getLogger("rm_server")
_GPU_SIZING = threading.Lock()
"""Models measure free GPU memory and claim their budgets one at a time (see `LoadedModel._gpu_budget`)."""
ENSEMBLE_FILE = "ensemble.json"


@dataclass(frozen=True)
class ModelIdentity:
    """Which model scored an answer: name, version and `served_sha256` (the bundle's files, recipe and the
    variant served); an ensemble's is a digest of its members'."""

    name: str
    version: str
    sha256: str

    @property
    def http_headers(self) -> dict[str, str]:
        """Set on every HTTP answer it scored, so a trainer's logs can show which model gave a reward."""
        return {"X-Reward-Model": f"name={self.name}; version={self.version}; sha256={self.sha256}"}

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelSettings(BatchingOptions):
    """How every bundle version is served; these fields are rm-serve's flags too (ServerConfig inherits them)."""

    variant: str = option("fp32", "Bundle variant to serve: fp32, int8 or fp16.")
    providers: str = option("cpu", "Execution providers in order of preference, comma-separated: tensorrt, cuda, cpu.")
    threads: int = option(0, "ONNX Runtime intra-op threads (0: one per core).")
    tokenizer_processes: int = option(
        2,
        "Processes per model version that parse its tokenizer and tokenize requests (0: threads of the serving "
        "process, where a new version's tokenizer pauses every call while it parses).",
    )
    max_samples_per_request: int = option(
        4096,
        "Samples accepted in one request, at most --max-queue; larger requests get INVALID_ARGUMENT (the "
        "client splits them by the limit GetModelInfo reports).",
    )
    verify: bool = option(True, "Check every bundle file's sha256 before loading.")
    cache_mb: float = option(
        0,
        "Exact reward cache per loaded model version, in MiB (0: off): rewards by token ids, identical samples "
        "in flight computed once.",
    )

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"--variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if self.max_batch_tokens < 0:
            raise ConfigError("--max-batch-tokens must not be negative")
        for name in ("max_batch_size", "max_queue", "max_samples_per_request"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.tokenizer_processes < 0:
            raise ConfigError("--tokenizer-processes must be 0 (threads of the serving process) or more")
        if self.max_delay_ms < 0:
            raise ConfigError("--max-delay-ms must not be negative")
        if not 0 <= self.cache_mb < float("inf"):
            raise ConfigError("--cache-mb must be a number of MiB >= 0 (0: no cache)")
        if not self.provider_list:
            raise ConfigError("--providers must name at least one execution provider: tensorrt, cuda or cpu")

    @property
    def provider_list(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.providers.split(",") if p.strip())

    @property
    def limits(self) -> Limits:
        # A request larger than the queue could never be admitted, and its RESOURCE_EXHAUSTED would send
        # clients into endless retries: such a request is refused as INVALID_ARGUMENT instead, and
        # GetModelInfo reports the capped limit, so clients split their calls to fit.
        per_request = min(self.max_samples_per_request, self.max_queue)
        return Limits(max_samples_per_request=per_request, max_admitted=self.max_queue)

    def batcher_config(self, max_length: int, pad_id: int, on_gpu: bool) -> BatcherConfig:
        try:
            budget = self.token_budget(max_length, on_gpu)
        except ValueError as e:
            raise BundleError(str(e)) from None
        return BatcherConfig(
            max_batch_tokens=budget,
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            max_queue=self.max_queue,
            pad_id=pad_id,
        )


class LoadedModel:
    """One bundle version with its engine, batcher and scorer; counts the calls using it."""

    def __init__(self, name: str, version: str, bundle: Bundle, settings: ModelSettings, metrics: ServiceMetrics):
        self.name, self.version, self.bundle, self.settings = name, version, bundle, settings
        path = bundle.model_path(settings.variant)
        try:
            self.engine = OnnxEngine(path, settings.provider_list, settings.threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (Fail, InvalidGraph, ...)
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BundleError(f"{path}: ONNX Runtime cannot load it: {first_line[:500]}") from None
        self.identity = ModelIdentity(name, version, served_sha256(bundle.directory, settings.variant))
        self.inflight = 0
        self._metrics = metrics

    @classmethod
    async def load(cls, name: str, version: str, directory: Path, settings: ModelSettings, metrics: ServiceMetrics):
        """Verify and create the session (in a thread: it takes seconds, and a hot reload must not stall the
        calls being served), start the tokenizer processes and batching, warm up."""

        def build() -> LoadedModel:
            return cls(name, version, load_bundle(directory, verify=settings.verify), settings, metrics)

        model = await asyncio.to_thread(build)
        try:
            await model.start()
        except BaseException:  # a failed warm-up leaves no batcher task, thread pool or session behind
            await model.stop(grace_s=0)
            raise
        return model

    async def start(self) -> None:
        recipe, manifest = self.bundle.recipe, self.bundle.manifest
        config = self.settings.batcher_config(recipe.max_length, manifest.get("pad_token_id") or 0, self.engine.on_gpu)
        if self.engine.on_gpu and not self.settings.max_batch_tokens:
            budget = await asyncio.to_thread(self._gpu_budget, config)
            config = dataclasses.replace(config, max_batch_tokens=budget)
        self.engine.reserve(config.max_batch_tokens, config.max_batch_size)
        self.tokenizer = await asyncio.to_thread(self._start_tokenizer)
        self.batcher = Batcher(self.engine, config, on_batch=self._metrics.record_batch)
        settings = self.settings
        cache = RewardCache(int(settings.cache_mb * 2**20), self._metrics.cache_lookups) if settings.cache_mb else None
        self.scorer = Scorer(
            self.bundle,
            self.tokenizer,
            settings.variant,
            self.batcher,
            settings.limits,
            cache,
        )
        self.batcher.start()
        await asyncio.to_thread(self._check_reference, config.pad_id)

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

    def _gpu_budget(self, config: BatcherConfig) -> int:
        """Run the default budget's worth of longest rows, size the budget from the memory it took, then claim
        it: one batch of the whole budget runs, so ONNX Runtime's arena holds that memory from now on. Sized
        without the claim, each model of a repository (or a reload beside the old version) counted the memory
        the others would take later as free, and together they overcommitted the GPU. One model at a time."""
        max_length = self.bundle.recipe.max_length
        rows = max(1, config.max_batch_tokens // max_length)
        with _GPU_SIZING:
            before = free_gpu_memory()
            self.engine.score(*pad_batch([[1] * max_length] * rows, 0))
            after = free_gpu_memory()
            if before is None or after is None:
                log.warning("GPU memory unreadable (nvidia-ml-py); token budget stays %d", config.max_batch_tokens)
                return config.max_batch_tokens
            tokens = rows * max_length
            cap = config.max_batch_size * max_length
            budget = budget_from_memory(after, (before - after) / tokens, tokens, cap) // max_length * max_length
            try:
                self.engine.score(*pad_batch([[1] * max_length] * (budget // max_length), 0))
            except Exception as e:  # noqa: BLE001 - out of memory after all: keep what is known to fit
                log.warning(
                    "%s: a batch of %d padded tokens failed (%s); token budget %d", self.name, budget, e, tokens
                )
                return tokens
            log.info(
                "%s: %d padded tokens took %.0f MiB of GPU memory; %.0f MiB free; token budget %d (claimed)",
                self.name,
                tokens,
                (before - after) / 2**20,
                after / 2**20,
                budget,
            )
            return budget

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


@dataclass(frozen=True)
class EnsembleScores:
    """Per sample: members' normalized rewards (members x samples) and their reductions."""

    members: np.ndarray
    num_tokens: list[int]
    truncated: list[bool]
    identity: ModelIdentity

    @property
    def mean(self) -> np.ndarray:
        return self.members.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        return self.members.std(axis=0)

    @property
    def min(self) -> np.ndarray:
        return self.members.min(axis=0)

    def reduce(self, how: str, k: float) -> np.ndarray:
        if how == "mean":
            return self.mean
        if how == "mean_minus_k_std":
            return self.mean - k * self.std
        if how == "min":
            return self.min
        raise InvalidRequest(f"unknown ensemble reduction {how!r}")


@dataclass
class Ensemble:
    """A model defined as a list of member models scored on the same inputs, one batch per member."""

    name: str
    members: list[str]
    version: str = "1"
    inflight: int = 0

    async def score(
        self, registry: ModelRegistry, inputs: list[SampleInput], strict: bool, max_tokens: int | None = None
    ) -> EnsembleScores:
        """Each member's rewards normalized with its own bundle statistics, so members on different scales
        weigh equally."""
        async with AsyncExitStack() as stack:
            models = [await stack.enter_async_context(registry.use(m, "")) for m in self.members]
            outcomes = await asyncio.gather(
                *(m.scorer.score(inputs, normalize=True, strict=strict, max_tokens=max_tokens) for m in models)
            )
        first = outcomes[0].results
        members = ",".join(f"{m.name}:{m.version}:{m.identity.sha256}" for m in models)
        return EnsembleScores(
            np.array([[r.reward for r in o.results] for o in outcomes]),
            [r.num_tokens for r in first],
            [any(o.results[i].truncated for o in outcomes) for i in range(len(first))],
            ModelIdentity(self.name, self.version, hashlib.sha256(members.encode()).hexdigest()[:SHA256_PREFIX]),
        )


def files_signature(directory: Path) -> tuple:
    """(path, size, mtime) of every file under `directory`: changes when any file is replaced or edited,
    without reading (hashing) any of them."""
    try:
        return tuple(
            (str(p.relative_to(directory)), (stat := p.stat()).st_size, stat.st_mtime_ns)
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        )
    except OSError:  # changing while read: different from anything cached
        return (("unreadable", time.time()),)


class ModelRegistry:
    def __init__(
        self, settings: ModelSettings, metrics: ServiceMetrics, default_model: str | None = None, grace_s: float = 30.0
    ):
        self.settings, self.metrics, self.grace_s = settings, metrics, grace_s
        self._rejected: dict[str, tuple] = {}
        """Rejected version directories by their files' (path, size, mtime): not retried until they change."""
        self.versions: dict[str, dict[str, LoadedModel]] = {}
        self.serving: dict[str, str] = {}
        """Per model, the version requests without model_version get."""
        self.ensembles: dict[str, Ensemble] = {}
        self.default_model = default_model
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()
        """Versions replaced or deleted by a scan, finishing their calls in the background."""

    # --- requests -----------------------------------------------------------------------------------------

    def resolve(self, name: str, version: str) -> LoadedModel | Ensemble:
        name = name or self.default_model or ""
        if name in self.ensembles:
            return self.ensembles[name]
        versions = self.versions.get(name)
        if not versions:
            known = ", ".join(sorted([*self.versions, *self.ensembles])) or "none"
            raise ModelNotFound(f"model '{loggable(name)}' is not loaded (loaded: {known})")
        version = version or self.serving[name]
        if version not in versions:
            raise ModelNotFound(
                f"model '{loggable(name)}' has no loaded version '{loggable(version)}' (loaded: {', '.join(versions)})"
            )
        return versions[version]

    @asynccontextmanager
    async def use(self, name: str, version: str) -> AsyncIterator[LoadedModel | Ensemble]:
        """The model a request runs on, from start to finish, even if a newer version takes over meanwhile."""
        model = self.resolve(name, version)
        model.inflight += 1
        try:
            yield model
        finally:
            model.inflight -= 1

    @property
    def cache_bytes(self) -> int:
        # every model in `versions` has started (add() inserts it after its load), so it has a scorer
        return sum(
            m.scorer.cache.bytes
            for versions in list(self.versions.values())
            for m in list(versions.values())
            if m.scorer.cache is not None
        )

    @property
    def queue_depth(self) -> int:
        # read from the metrics thread while reloads change the dicts: iterate over copies (list() of a dict
        # view is one step under the GIL)
        return sum(m.batcher.queue_depth for versions in list(self.versions.values()) for m in list(versions.values()))

    def loaded(self) -> list[tuple[str, str, bool, list[str], str]]:
        """(name, version, is_serving_version, ensemble members, sha256 prefix) for everything held."""
        out = [
            (name, version, self.serving.get(name) == version, [], model.identity.sha256)
            for name, versions in self.versions.items()
            for version, model in versions.items()
        ]
        return out + [(e.name, e.version, True, list(e.members), "") for e in self.ensembles.values()]

    # --- loading ------------------------------------------------------------------------------------------

    async def add(self, name: str, version: str, directory: Path, serve: bool = True) -> LoadedModel:
        model = await LoadedModel.load(name, version, Path(directory), self.settings, self.metrics)
        self.versions.setdefault(name, {})[version] = model
        if serve:
            self.serving[name] = version  # the switch: every request resolving after this line gets it
        self.metrics.loaded.labels(name, version).set(1)
        self.default_model = self.default_model or name
        log.info("loaded %s version %s (%s)", name, version, model.engine.providers[0])
        return model

    async def remove(self, name: str, version: str) -> None:
        await self._retire([self._detach(name, version)])

    def _detach(self, name: str, version: str) -> LoadedModel:
        """Take a version out of the registry: no request resolves to it from now on."""
        model = self.versions[name].pop(version)
        if not self.versions[name]:
            del self.versions[name]
        self.metrics.loaded.remove(name, version)
        return model

    async def _retire(self, models: list[LoadedModel]) -> None:
        """Let detached versions finish the calls that started on them (at most grace_s), then free them."""
        await asyncio.gather(*(m.stop(self.grace_s) for m in models))
        for m in models:
            log.info("unloaded %s version %s", m.name, m.version)

    async def sync(self, repository: Path, pins: dict[str, str]) -> dict[str, list[str]]:
        """Make the loaded set match the repository: load what the policy serves, switch, unload the rest
        (models and versions deleted from it too). A version that fails to load or verify is reported once
        and never takes traffic; it is tried again when its files change. Versions replaced or deleted drain
        in the background, so a slow drain never holds up the next reload."""
        report: dict[str, list[str]] = {"loaded": [], "unloaded": [], "rejected": []}
        retired: list[LoadedModel] = []
        async with self._lock:
            root = Path(repository).resolve()
            wanted_ensembles, present = {}, set()
            for model_dir in sorted(p for p in Path(repository).iterdir() if p.is_dir()):
                name = model_dir.name
                if (model_dir / ENSEMBLE_FILE).is_file():
                    try:
                        wanted_ensembles[name] = read_ensemble(model_dir)
                    except (OSError, ValueError) as e:
                        report["rejected"].append(f"{name}: {e}")
                    continue
                present.add(name)
                retired += await self._sync_model(model_dir, root, pins.get(name), report)
            for name in [n for n in self.versions if n not in present]:  # deleted from the repository
                retired += self._unload(name, keep=set(), report=report)
            accepted = {}
            for name, ensemble in wanted_ensembles.items():
                problem = self._ensemble_problem(ensemble, wanted_ensembles)
                if problem:
                    report["rejected"].append(f"{name}: {problem}")
                else:
                    accepted[name] = ensemble
            self.ensembles = accepted
        for line in report["rejected"]:
            log.error("model repository: rejected %s", line)
        if retired:  # in the background: the next scan (the poller's too) does not wait for the drain
            drain = asyncio.create_task(self._retire(retired))
            self._draining.add(drain)
            drain.add_done_callback(self._draining.discard)
        return report

    async def _sync_model(
        self, model_dir: Path, root: Path, pin: str | None, report: dict[str, list[str]]
    ) -> list[LoadedModel]:
        """Serve the newest version of one model that loads (or the pinned one); returns the versions
        detached from the registry (replaced, or deleted from disk), for the caller to drain."""
        name = model_dir.name
        loaded = self.versions.get(name, {})
        candidates = []
        for path in (p for p in model_dir.iterdir() if p.is_dir()):
            if not path.name.isdigit():
                problem = "version directories must be numbers (they order numerically: 10 is newer than 9)"
            elif not path.resolve().is_relative_to(root):
                problem = "resolves outside the model repository (a symbolic link?)"
            else:
                candidates.append(path.name)
                continue
            self._reject(f"{name}/{path.name}", files_signature(path), problem, report)
        candidates.sort(key=int, reverse=True)
        if pin is not None:
            candidates = [v for v in candidates if v == pin]
        target = None
        for version in candidates:  # newest first; fall back past versions that fail
            if version in loaded:
                target = version
                break
            key, signature = f"{name}/{version}", files_signature(model_dir / version)
            if self._rejected.get(key) == signature:
                continue  # rejected before and unchanged since: not re-verified, not re-reported
            try:
                await self.add(name, version, model_dir / version, serve=False)
            except Exception as e:  # noqa: BLE001 - whatever fails, this version never takes traffic
                # the signature from before the attempt: a copy that finished meanwhile is tried again
                self._reject(key, signature, f"{type(e).__name__}: {e}", report)
                continue
            self._rejected.pop(key, None)
            report["loaded"].append(key)
            target = version
            break
        if target is not None:
            self.serving[name] = target
        return self._unload(name, keep={target} if target is not None else set(candidates), report=report)

    def _unload(self, name: str, keep: set[str], report: dict[str, list[str]]) -> list[LoadedModel]:
        """Detach every loaded version of `name` not in `keep` (reported as unloaded), for the caller to
        drain; a model left with no version is no longer served."""
        retired = [self._detach(name, v) for v in list(self.versions.get(name, {})) if v not in keep]
        report["unloaded"] += [f"{name}/{m.version}" for m in retired]
        if name not in self.versions:
            self.serving.pop(name, None)
        return retired

    def _reject(self, key: str, signature: tuple, problem: str, report: dict[str, list[str]]) -> None:
        if self._rejected.get(key) != signature:
            self._rejected[key] = signature
            report["rejected"].append(f"{key}: {problem}")

    def _ensemble_problem(self, ensemble: Ensemble, ensembles: dict[str, Ensemble]) -> str | None:
        """Why an ensemble cannot be served (members must be loaded bundle models), or None."""
        if ensemble.name in ensemble.members:
            return "an ensemble cannot be its own member"
        nested = [m for m in ensemble.members if m in ensembles]
        if nested:
            return f"ensemble members must be bundle models, not ensembles: {', '.join(nested)}"
        missing = [m for m in ensemble.members if m not in self.versions]
        if missing:
            return f"ensemble members not loaded: {', '.join(missing)}"
        return None

    async def close(self) -> None:
        async with self._lock:  # after any scan in progress (SIGHUP, ReloadModels), none after
            held = [(name, version) for name, versions in self.versions.items() for version in versions]
            await self._retire([self._detach(name, version) for name, version in held])
            await asyncio.gather(*self._draining)


def read_ensemble(model_dir: Path) -> Ensemble:
    spec = json.loads((model_dir / ENSEMBLE_FILE).read_text())
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) for m in members):
        raise ValueError(f"{ENSEMBLE_FILE} needs 'members': a list of at least two model names")
    return Ensemble(model_dir.name, members, str(spec.get("version", "1")))
