"""Container health probe: exit 0 when the server reports SERVING on grpc.health.v1, 1 otherwise.

    rm-serve-probe --target 127.0.0.1:50051 --timeout 3

The image's HEALTHCHECK runs it; it needs only what the server installs (no client package).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout_s: float) -> str:
    """The overall serving status name (SERVING, NOT_SERVING, ...), or the gRPC status code name on failure."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rm-serve-probe", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of rm-serve (plaintext gRPC)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    status = check(args.target, args.timeout)
    print(status)
    sys.exit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
