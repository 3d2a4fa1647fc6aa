"""Start rm-serve as a child process on loopback and wait for SERVING; used by the tests, the benchmarks and
demos.

    server = start_server(bundle, Path("serve.log"), "--max-queue", "64")
    try:
        stub = server.stub()  # reward.v1 on server.target
    finally:
        stop_server(server)

The server runs as `python -m rm_server.main` in this interpreter: the rm_server it would import itself,
installed or from a checkout on PYTHONPATH (the GPU benchmark runs from one, with no scripts installed).
This module imports only grpc, grpc_health and the contract, never torch or the client.
"""

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
"""This interpreter's scripts directory: rm-serve and rm-serve-probe as pip installed them."""
RM_SERVE = (sys.executable, "-m", "rm_server.main")
"""rm-serve's command in this interpreter."""
START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    metrics_port: int
    """-1 when the server was started without its metrics endpoint."""
    log_path: Path | None
    """Where its stdout and stderr go (None: nowhere)."""
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
        return self.log_path.read_text() if self.log_path else ""


def start_server(
    bundle: Path | str,
    log_path: Path | None,
    *args: str,
    env: dict | None = None,
    port: int | None = None,
    secure: bool = False,
    token: str | None = None,
    bundle_flag: str = "--bundle",
    host: str = "127.0.0.1",
    metrics: bool = True,
    timeout_s: float = START_TIMEOUT_S,
) -> RunningServer:
    """Start rm-serve on `bundle` (`bundle_flag` --model-repository for a repository) with the flags `args`
    and wait until it serves: through plaintext health, or, for a TLS server or one whose health needs a
    token (`secure`, `token`), until its start-up line is logged. Its output goes to `log_path` (None:
    nowhere); `env` is added to this process's environment. RuntimeError, with the log, when it exits or
    does not serve within `timeout_s`; the process is killed then."""
    port, metrics_port = port or free_port(), free_port() if metrics else -1
    command = [
        *RM_SERVE,
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
    environment = {**os.environ, **(env or {})}
    if log_path is None:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=environment)
    else:
        with open(log_path, "w") as log_file:  # the child writes to its own copy of the descriptor
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    server = RunningServer(process, port, metrics_port, log_path, host)
    try:
        if secure or token:
            wait_for_log_line(server, "serving ", timeout_s)
        else:
            wait_until_serving(server.channel(), process, timeout_s)
    except RuntimeError as e:
        process.kill()
        process.wait()
        raise RuntimeError(f"{e}:\n{server.log()}") from None
    return server


def wait_until_serving(channel: grpc.Channel, process: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
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


def wait_for_log_line(server: RunningServer, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until the server's log holds `text`; RuntimeError if it exits or takes too long."""
    if server.log_path is None:
        raise ValueError("a server started without a log has no lines to wait for")
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        if server.process.poll() is not None:
            raise RuntimeError(f"rm-serve exited with code {server.process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rm-serve did not log {text!r} within {timeout_s:.0f} s")
        time.sleep(0.2)


def stop_server(server: RunningServer) -> int:
    """SIGTERM (rm-serve drains the calls in flight) and its exit code; TimeoutExpired after 60 s."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=60)


def failed_start(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """rm-serve on a bundle it must refuse, run to its exit (bounded): exit code and output."""
    command = [*RM_SERVE, "--bundle", str(bundle), "--port", str(free_port()), "--metrics-port", "-1"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def probe(target: str, **env: str) -> subprocess.CompletedProcess:
    """Run the installed rm-serve-probe script, as the image's HEALTHCHECK does, against `target`, with extra
    environment variables."""
    command = [str(BIN / "rm-serve-probe"), "--target", target, "--timeout", "3"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def timed_score(stub: reward_pb2_grpc.RewardServiceStub, request, timeout: float) -> tuple[str, float]:
    """One Score call: its status ("OK" or the error code's name) and how long the answer took."""
    started = time.perf_counter()
    try:
        stub.Score(request, timeout=timeout)
        return "OK", time.perf_counter() - started
    except grpc.RpcError as e:
        return e.code().name, time.perf_counter() - started
