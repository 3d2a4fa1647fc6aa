"""gRPC channels to one or several reward-service replicas: re-resolved names, keepalive, TLS, bearer token."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

MiB = 1024 * 1024
URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")
TOKEN_ENV = "RM_AUTH_TOKEN"
"""The bearer token's environment variable: the name rm-serve reads its own token from."""
TOKEN_ENV_ALIAS = "RM_TOKEN"
"""Also read, when RM_AUTH_TOKEN is unset or empty."""


def read_token(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token, by rm-serve's names: the content of `token_file` (`--auth-token-file`) when one is
    named, else the RM_AUTH_TOKEN environment variable, else RM_TOKEN; None when none holds one.

    Surrounding whitespace is stripped, as the server strips its own (a trailing newline would fail every
    call). An empty token file raises ValueError, an unreadable one OSError: a file named and not used
    would send calls without the token."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
        return token
    environ = os.environ if environ is None else environ
    return next((t for t in (environ.get(n, "").strip() for n in (TOKEN_ENV, TOKEN_ENV_ALIAS)) if t), None)


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


def replica_targets(targets: str | Sequence[str]) -> list[str]:
    """gRPC targets, one per replica.

    - A gRPC URI (`dns:///name:port`, `ipv4:a:p,b:p`, `unix:...`) is used as is; a DNS name that resolves to
      several addresses is balanced across all of them by round_robin.
    - Each `host:port` of a list (or of one comma-separated string) becomes `dns:///host:port`: gRPC
      resolves it, and resolves it again when a connection fails, so a restarted pod's new address is
      found (the name is not pinned to the address it had when the client started).
    """
    if isinstance(targets, str):
        targets = [targets] if targets.startswith(URI_SCHEMES) else targets.split(",")
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("no target given")
    out = []
    for target in targets:
        if target.startswith(URI_SCHEMES):
            out.append(target)
            continue
        _, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target {target!r} is not host:port")
        out.append(f"dns:///{target}")
    return out


class Replicas:
    """One channel per replica target; each call takes the next one that is not failing, in turn."""

    def __init__(self, targets: str | Sequence[str], security: Security, max_message_mb: int, keepalive_s: float):
        options = channel_options(max_message_mb, keepalive_s)
        self.channels = [
            grpc.aio.secure_channel(t, security.credentials(), options=options)
            if security.tls
            else grpc.aio.insecure_channel(t, options=options)
            for t in replica_targets(targets)
        ]
        self._turn = itertools.count()

    def pick(self) -> int:
        """The index of the channel for the next call: the next in turn, passing over those whose last
        connection attempt failed while another is usable."""
        start, n = next(self._turn), len(self.channels)
        for i in range(n):
            index = (start + i) % n
            if self.channels[index].get_state(try_to_connect=True) != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                return index
        return start % n

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


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
        # a replica's name is looked up again at most this often when its connections fail (gRPC: 30 s)
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ]
