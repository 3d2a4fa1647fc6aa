"""Open a gRPC channel to one or several reward-service replicas: round_robin, keepalive, TLS, bearer token."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

MiB = 1024 * 1024
URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")


@dataclass(frozen=True)
class Security:
    """Transport security and authentication, matching the server's options."""

    tls: bool = False
    ca_file: str | None = None
    """PEM bundle of the CA that signed the server's certificate (default: the system roots)."""
    cert_file: str | None = None
    """Client certificate for mutual TLS (with key_file)."""
    key_file: str | None = None
    token: str | None = None
    """Bearer token sent as `authorization: Bearer <token>` on every call."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


def resolve_target(targets: str | Sequence[str]) -> str:
    """One gRPC target for a replica set.

    - `host:port` or a gRPC URI (`dns:///name:port`, `ipv4:a:p,b:p`, `unix:...`) is used as is; a DNS name
      that resolves to several addresses is balanced across all of them by round_robin.
    - A list of `host:port` (or one comma-separated string) is resolved now into one `ipv4:`/`ipv6:` target,
      one address per replica.
    """
    if isinstance(targets, str):
        targets = [targets] if targets.startswith(URI_SCHEMES) else targets.split(",")
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0]
    addresses = [_address(t) for t in targets]
    families = {family for family, _ in addresses}
    if len(families) > 1:
        raise ValueError("cannot mix IPv4 and IPv6 replicas in one target list")
    return f"{families.pop()}:" + ",".join(address for _, address in addresses)


def _address(target: str) -> tuple[str, str]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r} is not host:port")
    host = host.strip("[]")
    info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    family, *_, sockaddr = info[0]
    if family == socket.AF_INET6:
        return "ipv6", f"[{sockaddr[0]}]:{port}"
    return "ipv4", f"{sockaddr[0]}:{port}"


def channel_options(max_message_mb: int, keepalive_s: float) -> list[tuple[str, object]]:
    service_config = {"loadBalancingConfig": [{"round_robin": {}}]}
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.max_receive_message_length", max_message_mb * MiB),
        ("grpc.max_send_message_length", max_message_mb * MiB),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a replica that went away is tried again soon after it comes back
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def open_aio_channel(
    targets: str | Sequence[str], security: Security, max_message_mb: int = 64, keepalive_s: float = 30.0
) -> grpc.aio.Channel:
    target = resolve_target(targets)
    options = channel_options(max_message_mb, keepalive_s)
    if security.tls:
        return grpc.aio.secure_channel(target, security.credentials(), options=options)
    return grpc.aio.insecure_channel(target, options=options)
