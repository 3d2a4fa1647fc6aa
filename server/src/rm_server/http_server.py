"""The optional HTTP port (`--http-port`): the routes RLHF trainers call over HTTP, on one aiohttp app with
the gRPC port's TLS settings and bearer token, answered through the same service as gRPC (one error table,
limits, batcher and metrics).

Routes: OpenRLHF's `POST /get_reward` (openrlhf_http.py) and vLLM's pooling API, `POST /classify`,
`POST /pooling`, `GET /v1/models` and `GET /health` (vllm_http.py). Every scoring answer carries the model
that scored it in an `X-Reward-Model` header (name, version, sha256 prefix of its bundle.json).
"""

from __future__ import annotations

import logging
import math
import ssl
import time

from aiohttp import web

from rm_server import openrlhf_http, vllm_http
from rm_server.service import RewardService


class _AtMostOnceEvery(logging.Filter):
    """aiohttp logs every malformed HTTP request at ERROR with a traceback, echoing the raw header (16 KB of
    log for an 8 KB header; 2,000 bad requests wrote 1.2 MB in a second): one line per interval, without
    the traceback, and how many were dropped."""

    def __init__(self, interval_s: float = 10.0):
        super().__init__()
        self.interval_s, self.last, self.dropped = interval_s, -math.inf, 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.dropped += 1
            return False
        self.last = now
        message = record.getMessage()[:300]
        if record.exc_info and record.exc_info[1] is not None:
            message += f": {type(record.exc_info[1]).__name__}: {str(record.exc_info[1])[:300]!r}"
        if self.dropped:
            message += f" ({self.dropped} more not logged in the last {self.interval_s:.0f} s)"
        record.msg, record.args, record.exc_info, record.exc_text, self.dropped = message, None, None, None, 0
        return True


_AIOHTTP_LOG = logging.getLogger("aiohttp.server")
if not any(isinstance(f, _AtMostOnceEvery) for f in _AIOHTTP_LOG.filters):
    _AIOHTTP_LOG.addFilter(_AtMostOnceEvery())


class HttpServer:
    def __init__(self, service: RewardService, max_body_mb: int, token: str | None = None):
        self.app = web.Application(client_max_size=max_body_mb * 1024 * 1024)
        openrlhf_http.add_routes(self.app, service, token)
        vllm_http.add_routes(self.app, service, token)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve on host:port; HTTPS with `ssl_context` (the gRPC port's TLS settings, so a bearer token
        never crosses in clear on one port while the other is encrypted)."""
        # a client that hangs up cancels its handler, so its request stops tokenizing (as gRPC cancels)
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the chosen port when asked for 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
