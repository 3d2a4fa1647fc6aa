"""The `X-Reward-Model` header every scoring answer on the HTTP port carries."""

from __future__ import annotations

from rm_server.core.results import ModelIdentity


def model_headers(model: ModelIdentity) -> dict[str, str]:
    """Set on every HTTP answer it scored, so a trainer's logs can show which model gave a reward."""
    return {"X-Reward-Model": f"name={model.name}; version={model.version}; sha256={model.sha256}"}
