"""Static checks of the deployment files: hadolint on the Dockerfile, Kubernetes schemas on deploy/k8s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def test_make_image_without_a_container_engine_says_what_to_install():
    result = subprocess.run(
        ["make", "--no-print-directory", "image", "CONTAINER=no-such-engine"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "make image needs docker with a running engine, or podman: install one" in result.stdout


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *map(str, paths)], capture_output=True, text=True
    )


def test_manifests_match_the_kubernetes_schemas():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    result = validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_manifest(tmp_path):
    broken = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    broken["spec"]["replicas"] = "two"
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert validate(path).returncode != 0


def test_deployment_drains_before_kubernetes_kills_it():
    """terminationGracePeriodSeconds must cover the preStop delay plus the server's drain (RM_GRACE_S)."""
    spec = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pre_stop + float(env["RM_GRACE_S"])
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "service.yaml").read_text())
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance across pods
