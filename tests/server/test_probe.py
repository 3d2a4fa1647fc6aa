"""`rm-serve-probe`, the image's HEALTHCHECK: exit 0 only when the server reports SERVING."""

from __future__ import annotations

from rm_server.launch import free_port, probe


def test_probe_passes_on_a_serving_server_and_fails_on_a_closed_port(server):
    serving = probe(server.target)
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING")
    down = probe(f"127.0.0.1:{free_port()}")
    assert (down.returncode, down.stdout.strip()) == (1, "UNAVAILABLE")
