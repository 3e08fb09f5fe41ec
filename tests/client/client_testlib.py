"""Helpers of the client tests: fast client configs, request makers, store peeking, subprocess env.

Everything talks to servers the tests start on 127.0.0.1; latencies are tens of milliseconds and
backoffs a few, so that hundreds of requests with faults take seconds.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

from client.config import ClientConfig
from client.request import Request

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def fast_config(server, store_path: str | None = None, **overrides) -> ClientConfig:
    """A client config for tests: short timeouts and backoffs, seeded jitter."""
    values = dict(base_url=server.base_url, api_key="test-key", timeout_s=2.0, deadline_s=30.0,
                  backoff_base_s=0.01, backoff_cap_s=0.2, store_path=store_path, seed=0, durable=False)
    values.update(overrides)
    return ClientConfig(**values)


def chat_requests(n: int, prefix: str = "q", **extra) -> list[Request]:
    """n distinct chat requests."""
    return [Request({"model": "test-model", "max_tokens": 4, **extra,
                     "messages": [{"role": "user", "content": f"{prefix} number {i}"}]}, "chat", f"{prefix}{i}")
            for i in range(n)]


def stored_keys(path: str) -> set[str]:
    """Keys of the completed requests in a store, read by a separate connection."""
    if not os.path.exists(path):
        return set()
    conn = sqlite3.connect(path, timeout=30)
    try:
        return {k for (k,) in conn.execute("SELECT key FROM results")}
    except sqlite3.OperationalError:  # not created yet
        return set()
    finally:
        conn.close()


def cli_env() -> dict:
    """Environment for `python -m client.cli` subprocesses: the repo importable, no real keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env



def neuronatlas() -> list[str]:
    """The command line of `neuronatlas` (engine.cli, as installed) when the engine's commands exist,
    else the client's own `python -m client.cli` (same subcommands, same handlers)."""
    try:
        import engine.commands  # noqa: F401
    except ImportError:
        return [PYTHON, "-m", "client.cli"]
    return [PYTHON, "-m", "engine.cli"]
