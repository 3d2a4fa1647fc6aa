"""gRPC's side of security: TLS / mutual TLS credentials and the bearer-token interceptor. Health checks may
stay open (probes rarely carry tokens); everything else, reflection included, needs the token when one is
configured."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import grpc

from rm_contract.config_cli import ConfigError
from rm_server.transport.security import token_matches

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with a client CA, clients must present a certificate it signed."""

    def read(path: str, flag: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from None

    root = read(client_ca, "--tls-client-ca") if client_ca else None
    pairs = [(read(key, "--tls-key"), read(cert, "--tls-cert"))]
    return grpc.ssl_server_credentials(pairs, root_certificates=root, require_client_auth=root is not None)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without `authorization: Bearer <token>`, except `open_methods`."""

    def __init__(self, token: str, open_methods: Collection[str] = HEALTH_METHODS):
        self._token = token
        self._open = frozenset(open_methods)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if token_matches(metadata.get("authorization"), self._token):
            return handler
        return _refusal(handler)


async def _deny(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization header)")


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that refuses before reading the request: request-streaming whatever the method (grpcio reads
    a unary request whole before calling its handler, and so received and parsed 60 MB messages from callers
    without a token), with no deserializer; responses keep the method's shape."""
    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    return make(_deny, request_deserializer=None, response_serializer=handler.response_serializer)
