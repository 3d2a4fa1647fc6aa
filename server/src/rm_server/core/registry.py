"""The models a server holds: bundle versions and ensembles of them, resolved per request, loaded from a
model repository and swapped in without stopping traffic.

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
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from rm_server.core.ensemble import ENSEMBLE_FILE, Ensemble, read_ensemble
from rm_server.core.logsafe import loggable
from rm_server.core.metrics import ServiceMetrics
from rm_server.core.model_version import ModelVersion
from rm_server.core.results import HeldModel
from rm_server.core.settings import ModelSettings
from rm_server.errors import ModelNotFound

log = logging.getLogger("rm_server")


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
        self,
        settings: ModelSettings,
        metrics: ServiceMetrics,
        default_model: str | None = None,
        grace_s: float = 30.0,
        default_aliases: Sequence[str] = (),
    ):
        self.settings, self.metrics, self.grace_s = settings, metrics, grace_s
        self._rejected: dict[str, tuple] = {}
        """Rejected version directories by their files' (path, size, mtime): not retried until they change."""
        self.versions: dict[str, dict[str, ModelVersion]] = {}
        self.serving: dict[str, str] = {}
        """Per model, the version requests without model_version get."""
        self.ensembles: dict[str, Ensemble] = {}
        self.default_model = default_model
        self.default_aliases = tuple(dict.fromkeys(default_aliases))
        """Other names of the default model (--served-model-name): trainers send their own name for it."""
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()
        """Versions replaced or deleted by a scan, finishing their calls in the background."""

    # --- requests -----------------------------------------------------------------------------------------

    def _aliases(self, name: str) -> tuple[str, ...]:
        return self.default_aliases if name == self.default_model else ()

    def resolve(self, name: str, version: str) -> ModelVersion | Ensemble:
        name = name or self.default_model or ""
        if name in self.default_aliases and name not in self.versions and name not in self.ensembles:
            name = self.default_model or ""
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
    async def use(self, name: str, version: str) -> AsyncIterator[ModelVersion | Ensemble]:
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

    def held(self) -> list[HeldModel]:
        """Everything held: each bundle version (serving or draining in) and each ensemble."""
        bundles = [
            HeldModel(
                name,
                version,
                self.serving.get(name) == version,
                name == self.default_model,
                [],
                model.identity.sha256,
                model.bundle.recipe.max_length,
                self._aliases(name),
            )
            for name, versions in list(self.versions.items())
            for version, model in list(versions.items())
        ]
        ensembles = [
            HeldModel(
                e.name,
                e.version,
                True,
                e.name == self.default_model,
                list(e.members),
                "",
                None,
                self._aliases(e.name),
            )
            for e in self.ensembles.values()
        ]
        return bundles + ensembles

    # --- loading ------------------------------------------------------------------------------------------

    async def add(self, name: str, version: str, directory: Path, serve: bool = True) -> ModelVersion:
        model = await ModelVersion.load(name, version, Path(directory), self.settings, self.metrics)
        self.versions.setdefault(name, {})[version] = model
        if serve:
            self.serving[name] = version  # the switch: every request resolving after this line gets it
        self.metrics.loaded.labels(name, version).set(1)
        self.default_model = self.default_model or name
        log.info("loaded %s version %s (%s)", name, version, model.engine.providers[0])
        return model

    async def remove(self, name: str, version: str) -> None:
        await self._retire([self._detach(name, version)])

    def _detach(self, name: str, version: str) -> ModelVersion:
        """Take a version out of the registry: no request resolves to it from now on."""
        model = self.versions[name].pop(version)
        if not self.versions[name]:
            del self.versions[name]
        self.metrics.loaded.remove(name, version)
        return model

    async def _retire(self, models: list[ModelVersion]) -> None:
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
        retired: list[ModelVersion] = []
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
    ) -> list[ModelVersion]:
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

    def _unload(self, name: str, keep: set[str], report: dict[str, list[str]]) -> list[ModelVersion]:
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
