"""A module-scoped rm-serve on the toy encoder bundle."""

from __future__ import annotations

import pytest

from tests.servers import start_server, stop_server


@pytest.fixture(scope="module")
def server(encoder_bundle, tmp_path_factory):
    running = start_server(
        encoder_bundle, tmp_path_factory.mktemp("server") / "serve.log", "--max-samples-per-request", "64"
    )
    yield running
    stop_server(running)
