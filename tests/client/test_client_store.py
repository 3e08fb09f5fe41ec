"""The durable request store: commit before report, dead letters, refusing what is not a store."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys

import pytest

from client.store import RequestStore, StoreError
from client_testlib import cli_env


async def test_a_reported_write_is_already_committed(store_path):
    store = RequestStore(store_path, durable=True)
    await store.put_result("k1", "chat", "m", b'{"choices": []}', 3, 4, 0.5, 2)
    # Another connection (another process after a crash) sees it once the future resolved.
    other = sqlite3.connect(store_path)
    assert other.execute("SELECT key, prompt_tokens, completion_tokens, attempts FROM results").fetchall() == [
        ("k1", 3, 4, 2)]
    other.close()
    got = store.get("k1")
    assert got.response == b'{"choices": []}' and got.cost == 0.5
    assert store.get("nope") is None
    store.close()


async def test_many_writes_commit_in_groups(store_path):
    store = RequestStore(store_path, durable=False)
    futs = [store.put_result(f"k{i}", "chat", "m", b"{}", 1, 1, None, 1) for i in range(500)]
    await asyncio.gather(*futs)
    assert store.counts() == {"results": 500, "dead_letters": 0}
    assert len(store.responses(f"k{i}" for i in range(0, 600, 2))) == 250
    store.close()


async def test_dead_letters_accumulate_and_a_success_revives(store_path):
    store = RequestStore(store_path)
    body = {"model": "m", "messages": []}
    await store.put_dead("k", "chat", body, "http", 500, "first", 3)
    await store.put_dead("k", "chat", body, "timeout", None, "second", 2)
    dead = store.get_dead("k")
    assert (dead.error_type, dead.status, dead.message, dead.attempts, dead.runs) == ("timeout", None, "second", 5, 2)
    assert dead.body == body
    assert [d.key for d in store.dead_letters()] == ["k"]
    await store.put_result("k", "chat", "m", b"{}", 1, 1, None, 1, was_dead=True)
    assert store.get_dead("k") is None and store.get("k") is not None
    store.close()


def test_refuses_what_is_not_a_store(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="not a request store"):
        RequestStore(str(junk))
    newer = tmp_path / "newer.sqlite"
    RequestStore(str(newer)).close()
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema 99"):
        RequestStore(str(newer))
    other = tmp_path / "other.sqlite"  # another program's database: refused, and left as it was
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE results(a)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    with pytest.raises(StoreError, match="another program .*tables: results"):
        RequestStore(str(other))
    assert other.read_bytes() == before and not (tmp_path / "other.sqlite-wal").exists()
    # Others that keep a `meta` table too: one of (key, value), one of (name, value) that is no
    # store's, one with our meta beside tables of its own.
    for n, tables in enumerate([["CREATE TABLE meta(key TEXT, value TEXT)"],
                                ["CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT)",
                                 "INSERT INTO meta VALUES ('app', 'photos')"],
                                ["CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT)",
                                 "INSERT INTO meta VALUES ('schema_version', '1')", "CREATE TABLE users(id)"]]):
        other = tmp_path / f"other{n}.sqlite"
        conn = sqlite3.connect(other)
        for sql in tables:
            conn.execute(sql)
        conn.commit()
        conn.close()
        before = other.read_bytes()
        with pytest.raises(StoreError, match="another program"):
            RequestStore(str(other), exclusive=True)
        assert other.read_bytes() == before and not (tmp_path / f"other{n}.sqlite-wal").exists()
        assert not (tmp_path / f"other{n}.sqlite-lock").exists()  # nothing created beside it


def test_an_exclusive_store_is_held_until_closed(store_path):
    """Two runs sending through one store could both pay for a request neither has stored yet: a
    sending client holds the store, and a second one is refused (in this process or another)."""
    first = RequestStore(store_path, exclusive=True)
    with pytest.raises(StoreError, match=rf"in use by another run \(pid {os.getpid()}\).*--store"):
        RequestStore(store_path, exclusive=True)
    reader = RequestStore(store_path)  # reading results and dead letters holds nothing
    assert reader.counts() == {"results": 0, "dead_letters": 0}
    reader.close()
    other = subprocess.run([sys.executable, "-c", "import sys; from client.store import RequestStore, StoreError\n"
                            "try:\n    RequestStore(sys.argv[1], exclusive=True)\n"
                            "except StoreError as e:\n    print(e)\n    sys.exit(3)", store_path],
                           capture_output=True, text=True, env=cli_env(), timeout=60)
    assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout, other
    first.close()
    second = RequestStore(store_path, exclusive=True)  # free again once closed
    second.close()
