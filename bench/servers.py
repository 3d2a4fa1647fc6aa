"""Start and stop the servers under test as child processes, and read their peak memory."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import loadgen

from rm_server.launch import free_port, start_server

ROOT = Path(__file__).resolve().parent.parent
PYTRITON_PYTHON = ROOT / ".venv-pytriton" / "bin" / "python"


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(process: subprocess.Popen, ready: Callable[[], bool], name: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready")
        if ready():
            return
        time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"{name} was not ready within {timeout_s} s")


@contextmanager
def rm_serve(
    bundle: str, variant: str, extra: list[str] = (), log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A running rm-serve (rm_server.launch: this interpreter's rm_server, installed or on PYTHONPATH), without
    its metrics endpoint: yields (target, process). Its log goes to `log`, or nowhere."""
    server = start_server(bundle, log, "--variant", variant, *extra, metrics=False, timeout_s=240)
    try:
        yield server.target, server.process
    finally:
        stop(server.process)


@contextmanager
def rm_serve_http(bundle: str, variant: str, *args: str) -> Iterator[tuple[str, str]]:
    """A running rm-serve (with `args` added) with its HTTP port and its metrics endpoint: yields (base URL,
    metrics URL)."""
    http_port = free_port()
    server = start_server(bundle, None, "--variant", variant, "--http-port", str(http_port), *args, timeout_s=600)
    try:
        yield f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{server.metrics_port}/metrics"
    finally:
        stop(server.process)


def counters(metrics_url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each Prometheus sample in `names` (a counter, or a histogram's _sum or _count), summed over its labels."""
    totals = dict.fromkeys(names, 0.0)
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _http_ready(base_url: str, protocol: loadgen.HttpProtocol) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            loadgen.post(base_url + protocol.path, protocol.body([("hi", "hello")]), timeout=5)
            return True
        except OSError:
            return False

    return ready


@contextmanager
def naive_server(checkpoint: str) -> Iterator[str]:
    """The OpenRLHF-style baseline (bench/naive_server.py): yields its base URL."""
    port = free_port()
    script = ROOT / "bench" / "naive_server.py"
    process = subprocess.Popen(
        [sys.executable, str(script), "--model", checkpoint, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, _http_ready(base_url, loadgen.NAIVE), "naive server")
        yield base_url
    finally:
        stop(process)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports_in_a_row(n: int) -> int:
    while not all(_bindable((port := free_port()) + k) for k in range(1, n)):
        pass
    return port


def pytriton_unavailable() -> str | None:
    """Why the PyTriton reference cannot run here, or None."""
    if not PYTRITON_PYTHON.exists():
        return f"{PYTRITON_PYTHON} missing (make bench-env creates it)"
    return None


@contextmanager
def pytriton_server(bundle: str, variant: str) -> Iterator[str]:
    """Triton's dynamic batcher (bench/pytriton_server.py, own venv): yields its HTTP base URL."""
    port = _free_ports_in_a_row(3)  # HTTP, gRPC, metrics
    libdir = sysconfig.get_config_var("LIBDIR")  # Triton's Python backend loads the interpreter's libpython
    process = subprocess.Popen(
        [str(PYTRITON_PYTHON), str(ROOT / "bench" / "pytriton_server.py")]
        + ["--bundle", bundle, "--variant", variant, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": libdir, "HOME": str(Path.home())},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, _http_ready(base_url, loadgen.TRITON), "pytriton server")
        yield base_url
    finally:
        stop(process)
