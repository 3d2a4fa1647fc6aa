"""The bearer token by rm-serve's names on the client side: `--auth-token-file` and RM_AUTH_TOKEN, with
`--token-file` and RM_TOKEN as aliases (the server's name wins when both are set)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rm_client import read_token
from rm_client.cli import parse_args
from rm_client.trl_reward import ServiceReward
from rm_client.verl_reward import compute_score
from rm_server.launch import start_server, stop_server

TOKEN = "s3cret-token"
RM_CLIENT = str(Path(sys.executable).parent / "rm-client")


def test_read_token_prefers_the_file_then_rm_auth_token_then_rm_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    both = {"RM_AUTH_TOKEN": " canonical\n", "RM_TOKEN": "alias"}
    assert read_token(str(token_file), both) == "from-file"
    assert read_token(None, both) == "canonical"
    assert read_token(None, {"RM_TOKEN": "alias"}) == "alias"
    assert read_token(None, {"RM_AUTH_TOKEN": "  ", "RM_TOKEN": "alias"}) == "alias"  # blank counts as unset
    assert read_token(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(str(tmp_path / "empty"), both)
    with pytest.raises(OSError):
        read_token(str(tmp_path / "missing"), both)


def test_rm_client_token_flags_resolve_canonical_first(tmp_path):
    canonical, alias = tmp_path / "canonical", tmp_path / "alias"
    canonical.write_text("canonical")
    alias.write_text("alias")

    def token(*flags: str, environ: dict | None = None) -> str | None:
        _, args = parse_args(["info", "--target", "h:1", *flags])
        return args.security(environ or {}).token

    assert token("--auth-token-file", str(canonical), "--token-file", str(alias)) == "canonical"
    assert token("--token-file", str(alias), "--auth-token-file", str(canonical)) == "canonical"
    assert token("--token-file", str(alias), environ={"RM_AUTH_TOKEN": "env"}) == "alias"
    assert token(environ={"RM_AUTH_TOKEN": "env", "RM_TOKEN": "old"}) == "env"
    assert token(environ={"RM_TOKEN": "old"}) == "old"
    assert token() is None


@pytest.fixture(scope="module")
def token_server(encoder_bundle, tmp_path_factory):
    running = start_server(
        encoder_bundle, tmp_path_factory.mktemp("token") / "serve.log", env={"RM_AUTH_TOKEN": TOKEN}, token=TOKEN
    )
    yield running
    stop_server(running)


def rm_client(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RM_AUTH_TOKEN", "RM_TOKEN")} | env
    return subprocess.run([RM_CLIENT, *args], capture_output=True, text=True, timeout=120, env=environment)


def test_rm_client_reaches_a_token_server_by_either_name(token_server, tmp_path):
    info = ("info", "--target", token_server.target, "--timeout", "10")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(TOKEN + "\n")
    bad.write_text("wrong")
    refused = rm_client(*info)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    for flags, env in [
        ((), {"RM_AUTH_TOKEN": TOKEN}),
        ((), {"RM_TOKEN": TOKEN}),
        ((), {"RM_AUTH_TOKEN": TOKEN, "RM_TOKEN": "wrong"}),
        (("--auth-token-file", str(good)), {}),
        (("--token-file", str(good)), {}),
        (("--auth-token-file", str(good), "--token-file", str(bad)), {"RM_AUTH_TOKEN": "wrong"}),
    ]:
        result = rm_client(*info, *flags, **env)
        assert result.returncode == 0, (flags, env, result.stderr)
    wrong = rm_client(*info, **{"RM_AUTH_TOKEN": "wrong", "RM_TOKEN": TOKEN})
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    (tmp_path / "empty").write_text("")
    empty = rm_client(*info, "--auth-token-file", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "is empty" in empty.stderr


def test_the_trainer_adapters_send_the_environments_token(token_server, monkeypatch):
    monkeypatch.delenv("RM_TOKEN", raising=False)
    monkeypatch.setenv("RM_AUTH_TOKEN", TOKEN)
    reward = ServiceReward(token_server.target, timeout_s=30)
    try:
        assert len(reward(["How was it?"], ["Lovely."])) == 1
    finally:
        reward.close()
    info = {"prompt": "How was it?"}
    scored = asyncio.run(compute_score("demo", "Lovely.", extra_info=info, target=token_server.target, timeout_s=30))
    assert isinstance(scored["score"], float)
