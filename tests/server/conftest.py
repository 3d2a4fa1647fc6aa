"""Module-scoped rm-serve processes on the toy encoder bundle: plain, and with a bearer token and the HTTP port."""

from __future__ import annotations

import pytest

from rm_server.launch import free_port, start_server, stop_server


@pytest.fixture(scope="module")
def server(encoder_bundle, tmp_path_factory):
    running = start_server(
        encoder_bundle, tmp_path_factory.mktemp("server") / "serve.log", "--max-samples-per-request", "64"
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def token_server(encoder_bundle, tmp_path_factory):
    """Token `s3cret-token` on every call but health; `http_url`: its OpenRLHF route."""
    directory = tmp_path_factory.mktemp("token")
    (directory / "token").write_text("s3cret-token\n")
    http_port = free_port()
    flags = ["--auth-token-file", str(directory / "token"), "--http-port", str(http_port)]
    server = start_server(encoder_bundle, directory / "serve.log", *flags)
    server.http_url = f"http://127.0.0.1:{http_port}/get_reward"
    yield server
    stop_server(server)
