"""Fixtures of the client tests: test servers on loopback and store paths (helpers: client_testlib)."""

from __future__ import annotations

import pytest

from client.testserver import ServerConfig, ServerThread


@pytest.fixture
def make_server():
    """make_server(responder=None, **ServerConfig fields) -> a running ServerThread (stopped after the test)."""
    started: list[ServerThread] = []

    def make(responder=None, **config) -> ServerThread:
        server = ServerThread(ServerConfig(**config), responder=responder).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def store_path(tmp_path) -> str:
    return str(tmp_path / "requests.sqlite")
