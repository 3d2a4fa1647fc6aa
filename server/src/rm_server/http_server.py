"""The optional HTTP port (`--http-port`): the routes RLHF trainers call over HTTP, on one aiohttp app with
the gRPC port's TLS settings and bearer token, answered through the same service as gRPC (one error table,
limits, batcher and metrics).

Routes: OpenRLHF's `POST /get_reward` (openrlhf_http.py) and vLLM's pooling API, `POST /classify`,
`POST /pooling`, `GET /v1/models` and `GET /health` (vllm_http.py). Every scoring answer carries the model
that scored it in an `X-Reward-Model` header (name, version, sha256 prefix of its bundle.json).
"""

from __future__ import annotations

import ssl

from aiohttp import web

from rm_server import openrlhf_http, vllm_http
from rm_server.service import RewardService


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
