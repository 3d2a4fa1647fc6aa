"""Prometheus metrics of the scoring service, in a registry of their own (one per server), recorded by the
core and the batcher for every transport alike (transport/metrics_endpoint.py exposes them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from rm_server.core.results import ScoreOutcome
from rm_server.runtime.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rm_requests", "RPCs answered, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.samples = Counter("rm_samples", "Samples scored", registry=r)
        self.cache_lookups = Counter(
            "rm_cache_lookups",
            "Samples looked up in the reward cache (--cache-mb): hit, merged (an identical sample was being "
            "computed) or miss",
            ["result"],
            registry=r,
        )
        self.cache_bytes = Gauge("rm_cache_bytes", "Memory held by the reward caches of the loaded models", registry=r)
        self.tokens = Counter("rm_tokens", "Tokens of the samples scored (not padding)", registry=r)
        self.shared_tokens = Counter(
            "rm_shared_prefix_tokens",
            "Tokens of the samples scored that were not computed: prefixes shared with another sample of the batch",
            registry=r,
        )
        self.truncated = Counter("rm_truncated_samples", "Samples truncated to the maximum length", registry=r)
        self.latency = Histogram(
            "rm_latency_seconds",
            "Time per request by stage: queue, tokenization, inference, total",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rm_batch_size", "Samples per batch run by the engine", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rm_batch_tokens",
            "Tokens computed per batch run by the engine, padding included",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "rm_batch_padding_ratio",
            "Fraction of a batch's tokens that are padding",
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
            registry=r,
        )
        self.batch_inference = Histogram(
            "rm_batch_inference_seconds", "Engine time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("rm_queue_depth", "Samples waiting in the batcher's queue", registry=r)
        self.model = Info("rm_model", "The server's configuration", registry=r)
        self.loaded = Gauge("rm_model_loaded", "1 per model version held", ["model", "version"], registry=r)

    def record_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.rows)
        self.batch_tokens.observe(stats.padded_tokens)
        self.padding_ratio.observe(1 - stats.real_tokens / stats.padded_tokens)
        self.batch_inference.observe(stats.inference_s)
        self.tokens.inc(stats.sample_tokens)
        self.shared_tokens.inc(stats.sample_tokens - stats.real_tokens)
        self.samples.inc(stats.rows)

    def record_outcome(self, outcome: ScoreOutcome) -> None:
        """A request's stage times and truncated samples, whichever transport it came through."""
        self.latency.labels("queue").observe(outcome.timing.queue_ms / 1000)
        self.latency.labels("tokenization").observe(outcome.timing.tokenization_ms / 1000)
        self.latency.labels("inference").observe(outcome.timing.inference_ms / 1000)
        self.truncated.inc(sum(r.truncated for r in outcome.results))
