"""Container health probe: exit 0 when the server reports SERVING on grpc.health.v1, 1 otherwise.

    rm-serve-probe --target 127.0.0.1:50051 --timeout 3

The image's HEALTHCHECK runs it; it needs only what the server installs (no client package). It carries
the server's own bearer token (RM_AUTH_TOKEN_FILE or RM_AUTH_TOKEN, as the container has them), so it also
works with --health-requires-auth.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_contract.config_cli import ConfigError
from rm_server.security import read_token


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
    parser = argparse.ArgumentParser(prog="rm-serve-probe", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of rm-serve (plaintext gRPC)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
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
