"""Real rm-serve processes on loopback ports, waited on through grpc.health.v1 (shared by the test packages
and, through bench/servers.py, by the benchmarks and demos)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_contract.pb import reward_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_score(stub, request, timeout: float) -> tuple[str, float]:
    """One Score call: its status ("OK" or the error code's name) and how long the answer took."""
    started = time.perf_counter()
    try:
        stub.Score(request, timeout=timeout)
        return "OK", time.perf_counter() - started
    except grpc.RpcError as e:
        return e.code().name, time.perf_counter() - started


def failed_start(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """rm-serve on a bundle it must refuse, run to its exit (bounded): exit code and output."""
    command = [str(BIN / "rm-serve"), "--bundle", str(bundle), "--port", str(free_port()), "--metrics-port", "-1"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def wait_until_serving(channel: grpc.Channel, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Poll grpc.health.v1 until the server reports SERVING; RuntimeError if it exits or takes too long."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rm-serve exited with code {process.returncode}")
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"rm-serve did not report SERVING within {timeout_s:.0f} s")


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self) -> reward_pb2_grpc.RewardServiceStub:
        return reward_pb2_grpc.RewardServiceStub(self.channel())

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status

    def log(self) -> str:
        return self.log_path.read_text()


def start_server(
    bundle: Path,
    log_path: Path,
    *args: str,
    env: dict | None = None,
    port: int | None = None,
    secure: bool = False,
    token: str | None = None,
    bundle_flag: str = "--bundle",
    host: str = "127.0.0.1",
) -> RunningServer:
    """Start rm-serve and wait until it serves: through plaintext health, or (TLS, or health behind a
    token) until its start-up line is logged."""
    port, metrics_port = port or free_port(), free_port()
    command = [
        str(BIN / "rm-serve"),
        bundle_flag,
        str(bundle),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--host",
        host,
        *args,
    ]
    log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = RunningServer(process, port, metrics_port, log_path, host)
    try:
        if secure or token:
            wait_for_log_line(server, "serving ")
        else:
            wait_until_serving(server.channel(), process)
    except RuntimeError as e:
        process.kill()
        raise RuntimeError(f"{e}:\n{server.log()}") from None
    return server


def wait_for_log_line(server: RunningServer, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        if server.process.poll() is not None:
            raise RuntimeError(f"rm-serve exited with code {server.process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rm-serve did not log {text!r} within {timeout_s:.0f} s")
        time.sleep(0.2)


def probe(target: str, **env: str) -> subprocess.CompletedProcess:
    """Run `rm-serve-probe` (the image's HEALTHCHECK) against `target`, with extra environment variables."""
    command = [str(BIN / "rm-serve-probe"), "--target", target, "--timeout", "3"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def stop_server(server: RunningServer) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=60)
