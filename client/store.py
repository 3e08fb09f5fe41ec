"""The durable request store: every completed reply, and every request that failed for good.

SQLite in WAL mode, keyed by the request key (client.request.request_key). A reply is reported to the
caller only after the transaction holding it has committed, so a crash or SIGKILL at any point loses
at most requests whose reply nobody had seen yet, and a rerun never pays for a stored one again.

Writes are collected on the event loop for `group_s` (25 ms) and handed to one writer thread as a
batch, which commits everything that has queued up in one transaction (group commit): with
synchronous=FULL each commit is an fsync, and batching keeps that, and the cost of waking the
thread, to at most 40 a second however many replies arrive (25 ms is nothing next to an LLM reply,
and slots in flight are freed before the write, so it costs no throughput). Reads (is this key
done?) use a second connection on the caller's thread; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,            -- sha256 of the canonical (kind, body)
    kind TEXT NOT NULL,              -- chat | completion
    model TEXT,
    response BLOB NOT NULL,          -- the reply body as received (JSON)
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL,                       -- USD by the price table at the time; NULL if unpriced
    attempts INTEGER NOT NULL,
    completed_at REAL NOT NULL       -- unix time
);
CREATE TABLE IF NOT EXISTS dead_letters (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,              -- the request body, so that retry-dead needs nothing else
    error_type TEXT NOT NULL,
    status INTEGER,
    message TEXT NOT NULL,
    attempts INTEGER NOT NULL,       -- over all runs
    runs INTEGER NOT NULL,           -- how many runs gave up on it
    failed_at REAL NOT NULL
);
"""


class _Rows(list):
    """Rows fetched whole (a damaged page fails while fetching, inside RequestStore._query)."""

    def fetchone(self):
        return self[0] if self else None

    def fetchall(self):
        return list(self)


class StoreError(Exception):
    """The store cannot be opened or written (not a store, newer schema, disk full, ...)."""


@dataclass
class StoredResult:
    """A completed request as stored."""

    key: str
    """The request key."""
    kind: str
    """chat | completion."""
    model: str | None
    """The request's model."""
    response: bytes
    """The reply body (JSON)."""
    prompt_tokens: int
    """usage.prompt_tokens of the reply."""
    completion_tokens: int
    """usage.completion_tokens of the reply."""
    cost: float | None
    """USD when it was paid for."""
    attempts: int
    """HTTP attempts it took."""


@dataclass
class DeadLetter:
    """A request that failed for good, with its last error."""

    key: str
    """The request key."""
    kind: str
    """chat | completion."""
    body: dict
    """The request body as sent."""
    error_type: str
    """RequestError.type of the last error."""
    status: int | None
    """HTTP status of the last error, if a reply came."""
    message: str
    """The last error's message."""
    attempts: int
    """Attempts over all runs."""
    runs: int
    """Runs that gave up on it."""
    failed_at: float
    """Unix time of the last failure."""


_TABLES = {"meta", "results", "dead_letters"}


def _is_ours(conn: sqlite3.Connection, tables: set[str]) -> bool:
    """Whether a database's tables are a request store's: only ours, and a `meta` (name, value)
    that names its schema version (or is empty: a store whose creation was cut short)."""
    if "meta" not in tables or not tables <= _TABLES:
        return False
    if [row[1] for row in conn.execute("PRAGMA table_info(meta)")] != ["name", "value"]:
        return False
    names = {name for (name,) in conn.execute("SELECT name FROM meta")}
    return not names or "schema_version" in names


def _connect(path: str, durable: bool, check: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    if check:
        # Before anything is written (the journal mode included): a database with tables other
        # than ours, or a `meta` that is not ours, belongs to another program and is left as it is.
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and not _is_ours(conn, tables):
            conn.close()
            raise StoreError(f"{path} is an SQLite database of another program (tables: "
                             f"{', '.join(sorted(tables)[:5])}), not a request store: pass another --store")
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit is fsynced (survives power loss); NORMAL survives crashes of this process.
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    return conn


def _hold(path: str) -> int:
    """An exclusive flock on the lock file beside the store (`PATH-lock`, holding the holder's pid),
    or StoreError when another process, or another open store in this one, holds it. The lock
    file is left in place (deleting it could split two runs onto two files); the lock goes with
    the process, however it ends."""
    import errno
    import fcntl

    lock = os.path.realpath(path) + "-lock"  # one lock for every name of the file (links, relative paths)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise StoreError(f"the request store {path} is in use by another run"
                             f"{f' (pid {holder})' if holder.isdigit() else ''}: wait for it to finish or stop it, or give "
                             "this run another store (batch: --store; explain, simulate: --requests); two runs on "
                             "one store could pay twice for a request") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class RequestStore:
    """Completed replies and dead letters of one store file. Async writes, sync reads.

    With `exclusive` (what a Client that sends requests opens) the store is held for this object's
    life: a second exclusive open, in this process or another, fails with StoreError. Without it
    (reading results and dead letters) nothing is held."""

    def __init__(self, path: str, durable: bool = True, group_s: float = 0.025, exclusive: bool = False):
        self.path = path
        self.durable = durable
        self.group_s = group_s
        self._lock_fd: int | None = None
        self._read: sqlite3.Connection | None = None
        parent = os.path.dirname(os.path.abspath(path))
        try:
            try:
                os.makedirs(parent, exist_ok=True)
                self._read = _connect(path, durable, check=True)
                if exclusive:  # after the check: nothing is created beside another program's database
                    self._lock_fd = _hold(path)
                self._read.executescript(_SCHEMA)
                row = self._read.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
                if row is None:
                    self._read.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
                elif row[0] != SCHEMA_VERSION:
                    raise StoreError(f"{path} is a request store of schema {row[0]}, this version reads "
                                     f"{SCHEMA_VERSION}: use a newer neuronatlas or another --store")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{path} is not a request store ({exc}): pass another --store") from None
            except OSError as exc:
                raise StoreError(f"cannot create the store {path}: {exc.strerror}") from None
        except StoreError:
            if self._read is not None:
                self._read.close()
            self._release()
            raise
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._pending: list = []          # (op, future) collected on the loop, not yet handed over
        self._handover: asyncio.TimerHandle | None = None

    # -- reads (caller's thread) ----------------------------------------------------------------

    def _query(self, sql: str, params=()):
        """A read; a store damaged inside (a bad page) is a StoreError naming it, not a traceback."""
        try:
            return _Rows(self._read.execute(sql, params).fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"the request store {self.path} is damaged ({exc}); restore it from a copy, or "
                             "move it away to start a new one (its requests would be sent and paid again)") from None

    def get(self, key: str) -> StoredResult | None:
        row = self._query(
            "SELECT key, kind, model, response, prompt_tokens, completion_tokens, cost, attempts "
            "FROM results WHERE key=?", (key,)).fetchone()
        return StoredResult(*row) if row else None

    def get_dead(self, key: str) -> DeadLetter | None:
        row = self._query(
            "SELECT key, kind, body, error_type, status, message, attempts, runs, failed_at "
            "FROM dead_letters WHERE key=?", (key,)).fetchone()
        return _dead(row) if row else None

    def responses(self, keys: Iterable[str], chunk: int = 500) -> dict[str, bytes]:
        """The stored reply of each of `keys` that has one."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, bytes] = {}
        for i in range(0, len(keys), chunk):
            part = keys[i:i + chunk]
            marks = ",".join("?" * len(part))
            out.update(self._query(f"SELECT key, response FROM results WHERE key IN ({marks})", part).fetchall())
        return out

    def dead_letters(self, keys: Iterable[str] | None = None, chunk: int = 500) -> Iterator[DeadLetter]:
        """All dead letters (oldest failure first), or those of `keys`."""
        sql = "SELECT key, kind, body, error_type, status, message, attempts, runs, failed_at FROM dead_letters"
        if keys is None:
            for row in self._query(sql + " ORDER BY failed_at, key").fetchall():
                yield _dead(row)
            return
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), chunk):
            part = keys[i:i + chunk]
            for row in self._query(sql + f" WHERE key IN ({','.join('?' * len(part))})", part).fetchall():
                yield _dead(row)

    def counts(self) -> dict[str, int]:
        """How many results and dead letters the store holds."""
        return {
            "results": self._query("SELECT count(*) FROM results").fetchone()[0],
            "dead_letters": self._query("SELECT count(*) FROM dead_letters").fetchone()[0],
        }

    def totals(self) -> dict[str, float]:
        """Tokens and cost of everything the store holds (all runs)."""
        p, c, cost = self._query(
            "SELECT coalesce(sum(prompt_tokens),0), coalesce(sum(completion_tokens),0), coalesce(sum(cost),0) "
            "FROM results").fetchone()
        return {"prompt_tokens": p, "completion_tokens": c, "cost": cost}

    # -- writes (one writer thread, group commit) -----------------------------------------------

    def put_result(self, key: str, kind: str, model: str | None, response: bytes, prompt_tokens: int,
                   completion_tokens: int, cost: float | None, attempts: int,
                   was_dead: bool = False) -> asyncio.Future:
        """Queue a completed reply; the future resolves once it is committed (or fails with StoreError)."""
        row = (key, kind, model, response, prompt_tokens, completion_tokens, cost, attempts, time.time())
        return self._submit(("result", row, was_dead))

    def put_dead(self, key: str, kind: str, body: dict, error_type: str, status: int | None, message: str,
                 attempts: int) -> asyncio.Future:
        """Queue a dead letter (replacing an older one for the same key, attempts added up)."""
        row = (key, kind, json.dumps(body, ensure_ascii=False), error_type, status, message, attempts, time.time())
        return self._submit(("dead", row, False))

    def _submit(self, op) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._failed is not None:
            fut.set_exception(StoreError(f"writing the store {self.path} failed: {self._failed}"))
            return fut
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, args=(loop,), name="request-store", daemon=True)
            self._writer.start()
        self._pending.append((op, fut))
        if self._handover is None:
            self._handover = loop.call_later(self.group_s, self._hand_over)
        return fut

    def _hand_over(self) -> None:
        self._handover = None
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    def _write_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = _connect(self.path, self.durable)
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = list(item)
                while True:  # everything that queued up while we were committing goes in one commit
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._queue.put(None)  # finish this batch, then stop
                        break
                    batch.extend(more)
                error = None
                try:
                    self._commit(conn, [op for op, _ in batch])
                except Exception as exc:  # whatever it is, the waiting futures must learn of it (no hang)
                    error = StoreError(f"writing the store {self.path} failed: {exc}")
                    self._failed = exc
                loop.call_soon_threadsafe(_resolve, [fut for _, fut in batch], error)
        finally:
            conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, ops) -> None:
        results = [row for kind, row, _ in ops if kind == "result"]
        revived = [(row[0],) for kind, row, was_dead in ops if kind == "result" and was_dead]
        dead = [row for kind, row, _ in ops if kind == "dead"]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if results:
                # The first reply stored wins: a later one for the same key (another process) is dropped.
                conn.executemany("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?)", results)
            if revived:
                conn.executemany("DELETE FROM dead_letters WHERE key=?", revived)
            if dead:
                conn.executemany(
                    "INSERT INTO dead_letters VALUES (?,?,?,?,?,?,?,1,?) ON CONFLICT(key) DO UPDATE SET "
                    "error_type=excluded.error_type, status=excluded.status, message=excluded.message, "
                    "attempts=dead_letters.attempts+excluded.attempts, runs=dead_letters.runs+1, "
                    "failed_at=excluded.failed_at", dead)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        if self._writer is not None and self._writer.is_alive():
            fut = asyncio.get_running_loop().create_future()
            self._pending.append((("noop", None, False), fut))
            if self._handover is not None:
                self._handover.cancel()
            self._hand_over()
            await fut

    def close(self) -> None:
        """Commit what is queued, stop the writer and close (call after the last write was awaited)."""
        if self._writer is not None:
            if self._handover is not None:
                self._handover.cancel()
            self._hand_over()
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        self._read.close()
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _resolve(futures, error) -> None:
    for fut in futures:
        if not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


def _dead(row) -> DeadLetter:
    key, kind, body, error_type, status, message, attempts, runs, failed_at = row
    return DeadLetter(key, kind, json.loads(body), error_type, status, message, attempts, runs, failed_at)


class NullStore:
    """No durability (store_path=None): nothing is found, writes resolve at once."""

    path = None

    def get(self, key):
        return None

    def get_dead(self, key):
        return None

    def put_result(self, *args, **kwargs) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    put_dead = put_result

    async def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
