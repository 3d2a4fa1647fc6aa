"""The optional HTTP port (`--http-port`): the routes RLHF trainers call over HTTP, on one aiohttp app with
the gRPC port's TLS settings and bearer token, answered through the inference core (same limits, batcher
and metrics as gRPC).

Routes: OpenRLHF's `POST /get_reward` (openrlhf.py) and vLLM's pooling API, `POST /classify`,
`POST /pooling`, `GET /v1/models` and `GET /health` (vllm.py). Each API module registers its routes with
the error shape its callers read; the bearer token is checked once, here, before any route runs. Every
scoring answer carries the model that scored it in an `X-Reward-Model` header.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from rm_contract.config_cli import ConfigError
from rm_server.core.inference import Inference
from rm_server.transport.http import openrlhf, vllm
from rm_server.transport.security import token_matches

ErrorResponse = Callable[[int, str], web.Response]
"""An API's error body for an HTTP status and a message."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health"})
"""Answered without the token: load balancers and probes carry none."""
ERROR_RESPONSES = web.AppKey("error_responses", dict)


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


def bearer_token_middleware(token: str):
    """401 in the route's own error shape without `Authorization: Bearer <token>`; 400 for a request with
    more than one Authorization header (which one a proxy or a framework reads differs: none is taken)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        error = request.app[ERROR_RESPONSES].get(request.path, _plain_error)
        presented = request.headers.getall("Authorization", [])
        if len(presented) > 1:
            return error(400, "more than one Authorization header: send the bearer token once")
        if not token_matches(presented[0] if presented else None, token):
            response = error(401, "missing or invalid bearer token (Authorization header)")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await handler(request)

    return authenticate


def _plain_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def http_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The gRPC port's TLS settings for the HTTP port: the same certificate, and the same client CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS files for the HTTP port: {e}") from None
    return context


class HttpServer:
    def __init__(self, inference: Inference, max_body_mb: int, token: str | None = None):
        middlewares = [bearer_token_middleware(token)] if token else []
        self.app = web.Application(client_max_size=max_body_mb * 1024 * 1024, middlewares=middlewares)
        self.app[ERROR_RESPONSES] = {}
        for api in (openrlhf, vllm):
            for path in api.add_routes(self.app, inference):
                self.app[ERROR_RESPONSES][path] = api.error_response
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve on host:port; HTTPS with `ssl_context` (the gRPC port's TLS settings, so a bearer token
        never crosses in clear on one port while the other is encrypted)."""
        # handler_cancellation: a client that hangs up cancels its handler, so its request stops tokenizing
        # (as gRPC cancels). auto_decompress off: bodies are never decompressed (compressed ones are refused
        # with 415 by `body.json_body`), so no Content-Encoding reaches aiohttp's decoders.
        # shutdown_timeout: the drain (--grace-s) has already waited for the calls in flight when the port
        # closes; aiohttp's default would let one still running hold the exit for 60 s more
        self._runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, auto_decompress=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the chosen port when asked for 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
