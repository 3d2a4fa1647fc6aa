"""The server image, built and run for real with podman (Debian's packages; no Docker engine here).

A Debian base made with debootstrap stands in for the CUDA base (`BASE_IMAGE`); it is built once and kept
in podman's storage, so later runs only rebuild the layers that changed. Skipped, with the reason, where
podman cannot run (not installed, not root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_client import RewardClient
from rm_server.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/rewardserve-base:bookworm"
IMAGE = "localhost/rewardserve:test"
RUN_FLAGS = ["--runtime", "runc", "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def podman_unavailable() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (make system-tools installs it with apt where it can)"
    if os.geteuid() != 0:
        return "podman here runs rootful only (the test needs root)"
    if subprocess.run(["podman", "info"], capture_output=True, timeout=60).returncode != 0:
        return "podman info fails on this host"
    return None


def ensure_base_image() -> None:
    """A minimal Debian bookworm image from debootstrap, imported once and reused."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed: no base image can be made here")
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        debootstrap = ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"]
        subprocess.run(debootstrap, check=True, capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
        tar.wait()


def build_image() -> None:
    """Build the Dockerfile on the Debian base; pip in the build uses the host's CA bundle (mounted)."""
    mounts = []
    if HOST_CA.is_file():
        conf = Path(tempfile.mkdtemp()) / "pip.conf"
        conf.write_text("[global]\ncert = /etc/pip-host-ca.crt\n")
        mounts = ["-v", f"{conf}:/etc/pip.conf:ro", "-v", f"{HOST_CA}:/etc/pip-host-ca.crt:ro"]
    # chroot isolation and the docker format (the OCI format drops HEALTHCHECK), as `make image` does
    flags = ["--isolation", "chroot", "--format", "docker", "--pull=never", "--build-arg", f"BASE_IMAGE={BASE}"]
    podman("build", *flags, *mounts, "-t", IMAGE, str(ROOT), timeout=1800)


@pytest.fixture(scope="module")
def image() -> str:
    if reason := podman_unavailable():
        print(f"container test skipped: {reason}")
        pytest.skip(reason)
    ensure_base_image()
    build_image()
    return IMAGE


def wait_healthy(name: str, timeout_s: float = 180) -> None:
    """Run the image's own HEALTHCHECK until it passes (podman runs it on demand without systemd)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"HEALTHCHECK never passed:\n{podman('logs', name, check=False).stderr[-3000:]}")


def test_image_serves_a_mounted_bundle_and_drains_on_sigterm(image, encoder_bundle, reference):
    config = podman("image", "inspect", image, "--format", "{{json .Config}}").stdout
    assert '"User":"10001"' in config and "Healthcheck" in podman("image", "inspect", image).stdout
    port, metrics_port, name = free_port(), free_port(), f"rewardserve-test-{os.getpid()}"
    env = {"RM_PORT": port, "RM_METRICS_PORT": metrics_port, "RM_HOST": "127.0.0.1"}
    env_flags = [part for key, value in env.items() for part in ("-e", f"{key}={value}")]
    podman("run", "-d", "--name", name, *RUN_FLAGS, *env_flags, "-v", f"{encoder_bundle}:/models/bundle:ro", image)
    try:
        wait_healthy(name)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with RewardClient(f"127.0.0.1:{port}") as client:
            rewards = client.score(["How was the food?"], ["It was wonderful."])
        assert rewards[0] == pytest.approx(reference("How was the food?", "It was wonderful."), abs=1e-5)
        podman("stop", "-t", "60", name, timeout=120)
        logs = podman("logs", name).stderr
        assert "shutting down: draining" in logs and "stopped (samples scored: 1)" in logs
        assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
    finally:
        podman("rm", "-f", name, check=False)


def test_image_has_the_contract_and_server_only(image):
    """No torch, no training code, no client: the server image installs rewardserve-contract and -server."""
    modules = ("torch", "transformers", "rm_training", "rm_client", "rm_contract", "rm_server")
    probe = f"import importlib.util as u; print([m for m in {modules!r} if u.find_spec(m)])"
    result = podman("run", "--rm", *RUN_FLAGS, "--entrypoint", "python3", image, "-c", probe)
    assert result.stdout.strip() == "['rm_contract', 'rm_server']"
