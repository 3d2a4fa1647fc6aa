"""The Prometheus endpoint (`--metrics-port`): the core's metrics registry over HTTP on a port of its own."""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

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


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Expose `registry` on host:port (prometheus-client's WSGI app, with an idle timeout per connection);
    returns the HTTP server so it can be shut down."""
    server_class = _IPv6Server if ":" in host else _IPv4Server
    server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
