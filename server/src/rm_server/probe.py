"""Container health probe: exit 0 when the server reports SERVING on grpc.health.v1, 1 otherwise.

    rm-serve-probe --target 127.0.0.1:50051 --timeout 3

The image's HEALTHCHECK runs it; it needs only what the server installs (no client package). It carries
the server's own bearer token (RM_AUTH_TOKEN_FILE or RM_AUTH_TOKEN, as the container has them), so it also
works with --health-requires-auth.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_contract.config_cli import ConfigError, option, parse_config
from rm_server.transport.security import read_token


@dataclass
class ProbeConfig:
    """rm-serve-probe's command line."""

    target: str = option("127.0.0.1:50051", "host:port of rm-serve (plaintext gRPC)")
    timeout: float = option(3.0, "seconds to wait for the answer")


def check(target: str, timeout_s: float, token: str | None = None) -> str:
    """The overall serving status name (SERVING, NOT_SERVING, ...), or the gRPC status code name on failure."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s, metadata=metadata
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def main(argv: list[str] | None = None) -> None:
    args = parse_config(ProbeConfig, argv, prog="rm-serve-probe", description=__doc__)
    try:
        token = read_token(os.environ.get("RM_AUTH_TOKEN_FILE"))
    except ConfigError as e:
        print(f"rm-serve-probe: error: {e}", file=sys.stderr)
        sys.exit(2)
    status = check(args.target, args.timeout, token)
    print(status)
    sys.exit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
