"""Prometheus metrics of the scoring service, in a registry of their own (one per server)."""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from rm_server.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
IDLE_TIMEOUT_S = 5.0
"""A metrics connection that sends nothing for this long is closed (each one holds a thread)."""


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S  # the socket timeout: an idle connection's thread ends instead of waiting forever

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError):  # an idle or vanished scraper: close quietly, no traceback
            pass


class _IPv4Server(ThreadingWSGIServer):
    daemon_threads = True


class _IPv6Server(ThreadingWSGIServer):
    daemon_threads = True
    address_family = socket.AF_INET6


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
        self.tokens = Counter("rm_tokens", "Tokens scored (real, not padding)", registry=r)
        self.truncated = Counter("rm_truncated_samples", "Samples truncated to the maximum length", registry=r)
        self.latency = Histogram(
            "rm_latency_seconds",
            "Time per request by stage: queue, tokenization, inference, total",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rm_batch_size", "Rows per batch run by the engine", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rm_batch_tokens", "Padded tokens per batch run by the engine", buckets=TOKEN_BUCKETS, registry=r
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
        self.tokens.inc(stats.real_tokens)
        self.samples.inc(stats.rows)

    def serve(self, host: str, port: int):
        """Expose the metrics on their own port (prometheus-client's WSGI app, with an idle timeout per
        connection); returns the HTTP server so it can be shut down."""
        server_class = _IPv6Server if ":" in host else _IPv4Server
        server = make_server(host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server
