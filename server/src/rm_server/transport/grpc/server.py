"""The gRPC port: reward.v1 RewardService, grpc.health.v1 and reflection on one grpc.aio server, with the
bearer-token and malformed-request interceptors, message size limits and keepalive policy."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rm_contract.pb import reward_pb2, reward_pb2_grpc
from rm_server.core.inference import Inference
from rm_server.transport.grpc.auth import HEALTH_METHODS, BearerTokenInterceptor, server_credentials
from rm_server.transport.grpc.malformed import MalformedRequestInterceptor
from rm_server.transport.grpc.servicer import RewardService

MIN_PING_INTERVAL_MS = 1000
"""Keepalive pings closer together than this count as abuse (gRPC core's default is 5 minutes)."""
SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


@dataclass(frozen=True)
class GrpcSettings:
    host: str
    port: int
    max_message_mb: int
    token: str | None = None
    health_requires_auth: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None


class GrpcServer:
    def __init__(self, inference: Inference, settings: GrpcSettings):
        self.settings = settings
        self.credentials = (
            server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            if settings.tls_cert
            else None
        )
        self.health = health.aio.HealthServicer()
        self.service = RewardService(inference)
        message_bytes = settings.max_message_mb * 1024 * 1024
        open_methods = () if settings.health_requires_auth else HEALTH_METHODS
        interceptors = [BearerTokenInterceptor(settings.token, open_methods)] if settings.token else []
        interceptors.append(MalformedRequestInterceptor())
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", message_bytes),
                ("grpc.max_send_message_length", message_bytes),
                # rm_client pings idle channels (30 s, without calls): accept that instead of answering
                # GOAWAY too_many_pings, which costs a long run's next call an UNAVAILABLE
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
            ],
        )
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    async def start(self) -> None:
        """Open the port reporting NOT_SERVING (until `set_serving`), so probes see the server loading."""
        await self.set_serving(False)
        address = f"{self.settings.host}:{self.settings.port}"
        if self.credentials:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
