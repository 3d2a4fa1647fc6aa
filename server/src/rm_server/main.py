"""Serve a reward-model bundle over gRPC (`rm-serve`).

    rm-serve --bundle runs/demo/bundle --port 50051 --metrics-port 9090

Every flag has an environment variable (RM_BUNDLE, RM_PORT, ...) for containers. Start-up: verify and
load the bundle, start the engine, warm it up, then report SERVING on grpc.health.v1. SIGTERM (or
SIGINT): health goes NOT_SERVING, new calls are refused, calls in flight finish within --grace-s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rm_contract.bundle import BundleError, load_bundle
from rm_contract.config_cli import ConfigError, option, parse_config
from rm_server.core.inference import Inference
from rm_server.core.metrics import ServiceMetrics
from rm_server.core.registry import ModelRegistry
from rm_server.core.settings import ModelSettings
from rm_server.runtime.batcher import BatcherConfig
from rm_server.transport.grpc.server import GrpcServer, GrpcSettings
from rm_server.transport.http.app import HttpServer, http_ssl_context
from rm_server.transport.metrics_endpoint import serve_metrics
from rm_server.transport.security import read_token

log = logging.getLogger("rm_server")


@dataclass(frozen=True)
class ServeArgs:
    """rm-serve's flags, each declared once with its help; `model_settings()` turns them into the runtime's
    plain values, whose modules hold the rules (bounds, what 0 means)."""

    bundle: str | None = option(None, "Model bundle directory written by rm-export (or --model-repo).")
    model_repo: str | None = option(
        None,
        "Model repository: NAME/VERSION/ bundles and NAME/ensemble.json ensembles, hot-reloaded (docs/operations.md).",
    )
    default_model: str | None = option(None, "Model answering requests that name none (default: the first by name).")
    served_model_name: tuple[str, ...] = option(
        (),
        "Names requests may use for the model, space-separated (vLLM's flag: veRL sends its model path as "
        "`model`). With --bundle the first NAME replaces the bundle's name in answers and metrics and the "
        "others are aliases of it; with --model-repo every NAME is an alias of the default model (a model of "
        "the repository with the same name wins).",
        metavar="NAME",
    )
    pin: str = option(
        "",
        "Pinned versions, NAME=VERSION[,NAME=VERSION]; other models serve their latest loadable version.",
    )
    poll_s: float = option(
        0.0,
        "Seconds between model-repository scans (0: scan at start and on the ReloadModels admin call only).",
    )
    variant: str = option("fp32", "Bundle variant to serve: fp32, int8 or fp16.")
    providers: str = option("cpu", "Execution providers in order of preference, comma-separated: tensorrt, cuda, cpu.")
    threads: int = option(0, "ONNX Runtime intra-op threads (0: one per core).")
    tokenizer_processes: int = option(
        2,
        "Processes per model version that parse its tokenizer and tokenize requests (0: threads of the serving "
        "process, where a new version's tokenizer pauses every call while it parses).",
    )
    max_batch_tokens: int = option(
        0,
        "Tokens computed per batch, padding included (rows x row width); 0: 1024 on CPU (bigger batches run "
        "slower per sample there, docs/benchmarks.md); on GPU sized from the free GPU memory after a 16384-token "
        "warm-up batch; never below the model's max length.",
    )
    max_batch_size: int = option(64, "Samples per batch.")
    packing: bool = option(
        True,
        "Pack several samples into one row of a batch, so no padding is computed (bundles of the packed form; "
        "--no-packing: one sample per row, for comparison).",
    )
    max_delay_ms: float = option(
        0.0,
        "Longest wait for more work before running a batch that is not full (0: batches form while the engine "
        "is busy, and an idle engine starts at once).",
    )
    max_queue: int = option(
        8192,
        "Samples held at most (being tokenized, waiting or being scored); further requests get RESOURCE_EXHAUSTED "
        "at once, before any work.",
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
    host: str = option(
        "127.0.0.1",
        "Address the gRPC server binds to (0.0.0.0 to listen on every interface, as in containers).",
    )
    port: int = option(50051, "gRPC port (0: pick a free one and log it).")
    metrics_host: str = option("127.0.0.1", "Address of the Prometheus endpoint.")
    metrics_port: int = option(9090, "Prometheus /metrics port (-1: no metrics endpoint).")
    http_port: int = option(
        -1,
        "HTTP port on `host` for OpenRLHF (POST /get_reward) and vLLM's pooling API (POST /classify, /pooling; "
        "GET /v1/models, /health): -1 off, 0 a free port.",
    )
    tls_cert: str | None = option(None, "PEM certificate chain of the server: serve gRPC over TLS (with --tls-key).")
    tls_key: str | None = option(None, "PEM private key of --tls-cert.")
    tls_client_ca: str | None = option(
        None,
        "PEM CA bundle: require clients to present a certificate it signed (mutual TLS).",
    )
    auth_token_file: str | None = option(
        None,
        "File holding the bearer token every call must carry (default: the RM_AUTH_TOKEN variable; none: no auth).",
    )
    health_requires_auth: bool = option(False, "Also require the token for grpc.health.v1 (probes usually carry none).")
    max_message_mb: int = option(64, "Largest gRPC message received or sent, in MiB.")
    grace_s: float = option(30.0, "On SIGTERM, how long calls in flight may take to finish.")
    log_level: str = "INFO"
    log_format: str = option("text", "text, or json (one object per line, for log pipelines).")

    def model_settings(self) -> ModelSettings:
        return ModelSettings(
            variant=self.variant,
            providers=tuple(p.strip() for p in self.providers.split(",") if p.strip()),
            threads=self.threads,
            tokenizer_processes=self.tokenizer_processes,
            max_samples_per_request=self.max_samples_per_request,
            verify=self.verify,
            cache_mb=self.cache_mb,
            batching=BatcherConfig(
                max_batch_tokens=self.max_batch_tokens,
                max_batch_size=self.max_batch_size,
                max_delay_ms=self.max_delay_ms,
                max_queue=self.max_queue,
                packing=self.packing,
            ),
        )

    def validate(self) -> None:
        self.model_settings().validate()
        if bool(self.bundle) == bool(self.model_repo):
            raise ConfigError("give exactly one of --bundle and --model-repo")
        if self.poll_s < 0:
            raise ConfigError("--poll-s must not be negative")
        if any(not name.strip() for name in self.served_model_name):
            raise ConfigError("--served-model-name: a name must not be blank")
        self.pins()
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.http_port < -1:
            raise ConfigError("--http-port must be -1 (off), 0 (any free port) or a port number")
        if self.max_message_mb < 1:
            raise ConfigError("--max-message-mb must be at least 1")

    def pins(self) -> dict[str, str]:
        pairs = [p.strip() for p in self.pin.split(",") if p.strip()]
        if any(p.count("=") != 1 or p.startswith("=") or p.endswith("=") for p in pairs):
            raise ConfigError(f"--pin must be NAME=VERSION[,NAME=VERSION], not {self.pin!r}")
        return dict(p.split("=") for p in pairs)


class RewardServer:
    """The running service: the inference core (models, engines, batchers) and its ports: gRPC with health,
    the optional HTTP port, the metrics endpoint."""

    def __init__(self, config: ServeArgs):
        config.validate()
        self.config = config
        self.token = read_token(config.auth_token_file)
        self.metrics = ServiceMetrics()
        aliases = config.served_model_name[1:] if config.bundle else config.served_model_name
        self.registry = ModelRegistry(
            config.model_settings(), self.metrics, config.default_model, config.grace_s, default_aliases=aliases
        )
        admin = self.reload if (config.model_repo and self.token) else None
        self.inference = Inference(self.registry, self.metrics, admin)
        self.grpc = GrpcServer(
            self.inference,
            GrpcSettings(
                config.host,
                config.port,
                config.max_message_mb,
                self.token,
                config.health_requires_auth,
                config.tls_cert,
                config.tls_key,
                config.tls_client_ca,
            ),
        )
        self._metrics_http = None
        self._poller: asyncio.Task | None = None
        self.http: HttpServer | None = None
        self._started = False

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self) -> None:
        config = self.config
        self._started = True
        await self.grpc.start()
        if config.metrics_port >= 0:
            self._metrics_http = serve_metrics(self.metrics.registry, config.metrics_host, config.metrics_port)
        self.metrics.model.info({"variant": config.variant, "providers": config.providers})
        self.metrics.queue_depth.set_function(lambda: self.registry.queue_depth)
        self.metrics.cache_bytes.set_function(lambda: self.registry.cache_bytes)
        await self._load_models()
        if config.http_port >= 0:
            self.http = HttpServer(self.inference, config.max_message_mb, self.token)
            tls = http_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
            await self.http.start(config.host, config.http_port, tls)
        self.inference.ready = True
        await self.grpc.set_serving(True)
        if config.model_repo and config.poll_s > 0:
            self._poller = asyncio.create_task(self._poll(), name="model-repo-poll")
        metrics_at = f"{config.metrics_host}:{config.metrics_port}" if config.metrics_port >= 0 else "off"
        scheme = "https" if config.tls_cert else "http"
        http_at = f"{scheme}://{config.host}:{self.http.port}" if self.http else "off"
        models = ", ".join(
            f"{m.name} v{m.version}" + (f" (sha256 {m.sha256})" if m.sha256 else "")
            for m in self.registry.held()
            if m.serving
        )
        log.info(
            "serving %s (%s) on %s:%d (%s, %s); metrics %s; HTTP (OpenRLHF, vLLM API) %s",
            models,
            config.variant,
            config.host,
            self.port,
            ("mutual TLS" if config.tls_client_ca else "TLS") if self.grpc.credentials else "plaintext",
            "bearer token required" if self.token else "no authentication",
            metrics_at,
            http_at,
        )

    async def _load_models(self) -> None:
        """The bundle, or the repository's models; start-up fails when nothing can be served."""
        if self.config.bundle:
            bundle = load_bundle(self.config.bundle, verify=False)  # hashes are checked by add()
            name = next(iter(self.config.served_model_name), bundle.manifest["name"])
            await self.registry.add(name, str(bundle.manifest["version"]), Path(self.config.bundle))
            return
        report = await self.reload()
        if not self.registry.versions:
            raise BundleError(
                f"no loadable model in {self.config.model_repo}; rejected: {report['rejected'] or 'none'}"
            )
        if self.registry.default_model and self.registry.default_model not in self.registry.serving:
            if self.registry.default_model not in self.registry.ensembles:
                raise ConfigError(f"--default-model {self.registry.default_model!r} is not in the repository")

    async def reload(self) -> dict[str, list[str]]:
        report = await self.registry.sync(Path(self.config.model_repo), self.config.pins())
        if report["loaded"] or report["unloaded"]:
            log.info("model repository: loaded %s, unloaded %s", report["loaded"] or "-", report["unloaded"] or "-")
        return report

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            await self._scan()

    async def rescan(self, why: str) -> None:
        if not (self.config.model_repo and self.inference.ready):
            log.info("%s ignored: no model repository to rescan, or not serving yet", why)
            return
        log.info("%s: rescanning the model repository", why)
        await self._scan()

    async def _scan(self) -> None:
        try:
            await self.reload()
        except Exception:  # noqa: BLE001 - a bad scan is logged; serving goes on with what is loaded
            log.exception("model repository scan failed")

    async def close(self, grace_s: float = 0.0) -> None:
        """Close whatever start-up opened: the gRPC port (calls in flight get `grace_s` more), the HTTP port,
        the models, the metrics port. At once when start-up is abandoned; the end of a drain otherwise."""
        if self._started:
            await self.grpc.stop(grace_s)
        if self.http is not None:
            await self.http.stop()
        await self.registry.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()

    async def stop(self, hurry: asyncio.Event | None = None) -> None:
        """Graceful drain: NOT_SERVING, refuse new calls, let calls in flight finish within the grace period
        (or until `hurry` is set: a second signal)."""
        hurry = hurry or asyncio.Event()
        log.info(
            "shutting down: draining %d calls in flight (grace %.0f s)", self.inference.inflight, self.config.grace_s
        )
        # Refuse new calls (UNAVAILABLE) and report NOT_SERVING while the calls in flight finish; the port
        # stays open meanwhile so that probes and load balancers can see the new status.
        self.inference.ready = False
        if self._poller is not None:  # awaited: a scan in progress must not load into a closing registry
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.grpc.enter_graceful_shutdown()
        deadline = time.monotonic() + self.config.grace_s
        quiet_since = None
        while time.monotonic() < deadline and not hurry.is_set():  # drained once no call has been in flight a while
            if self.inference.inflight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.3:  # late arrivals get UNAVAILABLE and go elsewhere
                break
            await asyncio.sleep(0.05)
        await self.close(0.0 if hurry.is_set() else max(0.0, deadline - time.monotonic()))
        served = self.metrics.registry.get_sample_value("rm_samples_total") or 0
        log.info("stopped (samples scored: %d)", served)


async def serve(config: ServeArgs) -> None:
    """Start, serve until SIGTERM or SIGINT, drain. Signals are handled from the first moment (docs/operations.md):
    a stop during start-up abandons it and exits 0; a second stop ends the drain at once; SIGHUP rescans the
    model repository; SIGUSR1 and SIGUSR2 are logged and ignored (they would otherwise kill the server)."""
    server = RewardServer(config)
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def terminate(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: ending the drain now", name)
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, terminate, sig.name)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.rescan("SIGHUP")))
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(sig, log.info, "%s ignored", sig.name)
    starting, stopped = loop.create_task(server.start()), loop.create_task(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        log.info("stopped during start-up")
        await server.close()
        return
    stopped.cancel()
    if starting.exception() is not None:  # a start-up failure (ConfigError, BundleError): its exit code
        await server.close()  # the port opened before the models loaded
        raise starting.exception()
    await stop.wait()
    await server.stop(hurry)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    if fmt not in ("text", "json"):
        raise ConfigError(f"--log-format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_config(ServeArgs, argv, prog="rm-serve", description=__doc__, env_prefix="RM")
        configure_logging(config.log_level, config.log_format)
        asyncio.run(serve(config))
    except (ConfigError, BundleError) as e:
        print(f"rm-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
