"""The Client: sends many requests under the limits, retries what can be retried, stores every reply.

    async with Client(ClientConfig(base_url=..., rpm=30_000, store_path="requests.sqlite")) as client:
        result = await client.complete({"model": "gpt-4o-mini", "messages": [...], "logprobs": True})
        reply = result.unwrap()                       # the parsed JSON reply, logprobs included
        results = await client.run_many(requests)     # list[Result], in input order
        async for result in client.stream(requests):  # in completion order, memory bounded
            ...

How a request travels: `_start` answers it from the store (completed or dead-lettered in an earlier
run) or joins an identical request already in flight (single-flight); otherwise it becomes a job on
the ready queue. One dispatcher takes jobs in turn (retries first), waits on the Limits (pause,
in-flight cap, RPM and TPM buckets) and starts an attempt. An attempt's reply is classified: a
success is committed to the store and only then reported; a retryable failure goes back on the queue
after a capped, fully jittered exponential backoff (a 429 instead pauses the dispatcher for the
server's Retry-After); a final failure is written to the dead-letter table and reported.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

from client.classify import classify
from client.config import ClientConfig
from client.limits import Limits
from client.request import (Request, RequestError, Result, Usage, max_completion_tokens, prompt_chars,
                            prompt_count)
from client.store import NullStore, RequestStore, StoreError
from client.transport import SetupError, Transport, TransportError

PROBE_EVERY_S = 1.0
"""How long one answer to the liveness probe (GET /models) stands for all failures."""
PROBE_TIMEOUT_S = 5.0
"""How long the probe waits for any reply (never longer than --timeout)."""
MOST_TOKENS = 10**12
"""The largest token estimate of one request (see Client._estimate)."""


class RunAborted(Exception):
    """The run had to stop for everyone (the key was refused, the server went away, the store failed)."""


@dataclass
class Stats:
    """Counters since the Client opened: what a progress bar and a summary need."""

    submitted: int = 0
    """Requests handed to the client."""
    ok: int = 0
    """Results delivered with a reply (any source)."""
    failed: int = 0
    """Results delivered with an error (any source, interrupted ones included)."""
    from_store: int = 0
    """Results answered from the store without HTTP (completed or dead-lettered earlier)."""
    from_store_failed: int = 0
    """Of those, the ones dead-lettered earlier (by an earlier run, or this one for an identical request; not resent)."""
    shared: int = 0
    """Results that reused the reply of an identical request in flight at the same time."""
    sent_ok: int = 0
    """Requests completed over HTTP this run (each paid once)."""
    dead_lettered: int = 0
    """Requests that failed for good this run."""
    interrupted: int = 0
    """Of the failed, results left unfinished by a stop (not dead-lettered: a rerun sends them)."""
    attempts: int = 0
    """HTTP attempts started."""
    retries: Counter = field(default_factory=Counter)
    """Retries by cause: '429', '500', 'timeout', 'connection', 'bad_body', ..."""
    errors: Counter = field(default_factory=Counter)
    """Final errors this run by 'type status: message'."""
    prompt_tokens: int = 0
    """usage.prompt_tokens of replies paid this run."""
    completion_tokens: int = 0
    """usage.completion_tokens of replies paid this run."""
    cost: float = 0.0
    """USD of replies paid this run (priced models only)."""
    unpriced: Counter = field(default_factory=Counter)
    """Replies of models without a price, by model."""
    first_sent_wall: float | None = None
    """Unix time of the first attempt."""
    last_first_attempt_wall: float | None = None
    """Unix time of the latest first attempt of a request (the end of the busy period)."""
    started: float = field(default_factory=time.monotonic)
    """Monotonic time the Client opened."""

    @property
    def done(self) -> int:
        return self.ok + self.failed


@dataclass
class _Outcome:
    raw: bytes | None
    usage: Usage
    cost: float | None
    error: RequestError | None
    attempts: int


class _Job:
    """One distinct request being worked on; identical requests share it."""

    __slots__ = ("request", "key", "kind", "body", "model", "payload", "chars", "prompt_est", "completion_est",
                 "has_budget", "future", "attempts", "counted", "failures", "first_sent", "sent_at", "was_dead",
                 "timer", "outage", "waiters", "cost_est", "attempting", "left", "orphan")

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.key = request.key
        self.kind = request.kind
        self.body = request.body
        self.model = request.body.get("model")
        self.payload = json.dumps(request.body, separators=(",", ":"), ensure_ascii=False).encode()
        self.future: asyncio.Future = loop.create_future()
        self.attempts = 0          # all attempts
        self.counted = 0           # attempts that count against max_attempts (not 429s, not outages)
        self.failures = 0          # retryable failures other than 429s (they set the backoff)
        self.first_sent: float | None = None
        self.sent_at = 0.0
        self.was_dead = False
        self.timer: asyncio.TimerHandle | None = None
        self.outage = False        # waiting after a failure while the server answered nobody
        self.waiters = 1           # callers waiting for it: when the last leaves, an unsent job is withdrawn
        self.cost_est = 0.0        # USD this attempt may cost at most (for max_cost), while in flight
        self.attempting = False    # from dispatch until its attempt is handled (reply stored, retry queued)
        self.left = ""             # why it was withdrawn once no caller waited (set when the last one left)
        self.orphan = False        # the caller it was started for left, others wait: the next result is 'sent'

    @property
    def tokens_est(self) -> float:
        return self.prompt_est + self.completion_est


def _when(pause: float) -> str:
    """The local time `pause` seconds from now, with its date when that is not today; beyond what
    a clock can show (a Retry-After of 1e300), the number of days."""
    try:
        then = time.localtime(time.time() + pause)
        today = time.localtime()
    except (OverflowError, OSError, ValueError):
        return f"{pause / 86400:.3g} days from now"
    same_day = (then.tm_year, then.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", then)


class Client:
    """Sends OpenAI requests under rate limits, with retries, single-flight and a durable store.

    Use as `async with Client(config) as client:`. A Client runs one dispatcher; after `stop()` it
    sends nothing more and is closed by leaving the `async with`.
    """

    def __init__(self, config: ClientConfig):
        self.config = config
        self.stats = Stats()
        self.limits = Limits(rpm=config.rpm, tpm=config.tpm, max_in_flight=config.max_in_flight,
                             headroom=config.headroom, burst_s=config.burst_s,
                             learn_from_headers=config.learn_from_headers,
                             backoff_base_s=config.backoff_base_s, backoff_cap_s=config.backoff_cap_s)
        self.transport = Transport(config)
        self.store: RequestStore | NullStore = NullStore()
        self.stopped = False
        self.abort_reason: str | None = None
        self._in_flight_cost = 0.0  # USD the requests in flight may cost at most (max_cost)
        self._rng = random.Random(config.seed)
        self._jobs: dict[str, _Job] = {}
        self._fresh: deque[_Job] = deque()
        self._retry: deque[_Job] = deque()
        self._waiting: set[_Job] = set()   # in backoff
        self._tasks: set[asyncio.Task] = set()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._watermark = max(256, 2 * config.max_in_flight)
        self._dispatcher: asyncio.Task | None = None
        self._state = "new"  # new -> open -> closed
        self._chars_per_token = 4.0     # learned from usage.prompt_tokens
        self._chat_completion = 256.0   # tokens a chat reply without max_tokens takes, learned
        self._last_reply = time.monotonic()
        # When the first attempt sent since the last HTTP reply left (None: none since): how long
        # the server has been silent while asked, as opposed to the client having nothing to send.
        self._silent_since: float | None = None
        self._probe: asyncio.Task | None = None   # GET /models: is the server up at all?
        self._probe_done = -math.inf               # when the last probe ended (monotonic)
        self._outage = False                       # a failure found the server answering nobody
        # Requests that failed without a reply since the last one, on their first counted failure
        # yet: one alone may be a request the server cannot answer; two or more, a server that
        # answers nobody.
        self._silent_keys: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> "Client":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def open(self) -> None:
        if self._state != "new":
            raise SetupError(f"this Client is {'open already' if self._state == 'open' else 'closed'}: "
                             "make a new Client for another run")
        problems = self.config.problems()
        if problems:
            raise SetupError(problems[0])
        self._state = "open"
        if self.config.store_path:
            self.store = RequestStore(self.config.store_path, durable=self.config.durable, exclusive=True)
        await self.transport.open()
        self._last_reply = time.monotonic()
        self._silent_since = None
        self._dispatcher = asyncio.create_task(self._dispatch(), name="client-dispatcher")

    def _usable(self) -> None:
        """SetupError unless the Client is open (a closed one would read a closed store)."""
        if self._state != "open":
            raise SetupError("this Client is closed: make a new Client for another run" if self._state == "closed"
                             else "this Client is not open: use `async with Client(config) as client:` (or await "
                             "client.open())")

    async def check(self) -> list[str]:
        """Fail fast (SetupError, naming the fix) if the server cannot be used; returns its model ids."""
        self._usable()
        return await self.transport.check(timeout_s=min(10.0, self.config.timeout_s))

    def stop(self, cancel_in_flight: bool = False, reason: str | None = None) -> None:
        """Send nothing more: queued requests end as 'interrupted' (not dead-lettered, so a rerun sends
        them); requests in flight finish and are stored, or with cancel_in_flight are cancelled."""
        if not self.stopped:
            self.stopped = True
            if self._dispatcher is not None:
                self._dispatcher.cancel()
            message = reason or "not sent: the run was stopped"
            for job in list(self._fresh) + list(self._retry) + list(self._waiting):
                if job.timer is not None:
                    job.timer.cancel()
                self._interrupt(job, message)
            self._fresh.clear()
            self._retry.clear()
            self._waiting.clear()
            self._room.set()
            self.limits.wake()
        if cancel_in_flight:
            for task in list(self._tasks):
                task.cancel()

    async def aclose(self) -> None:
        """Stop, wait for what is in flight, commit the store and close the pool. Cancelled while
        it waits (a second Ctrl-C, a task group's teardown), it cancels what is in flight and still
        commits and releases the store and closes the pool."""
        if self._state == "closed":
            return
        self._state = "closed"
        self.stop()
        try:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._dispatcher is not None:
                await asyncio.gather(self._dispatcher, return_exceptions=True)
        finally:
            tasks = [t for t in [*self._tasks, self._dispatcher, self._probe] if t is not None]
            for task in tasks:
                task.cancel()  # no-op for those done
            await asyncio.shield(self._release(tasks))

    async def _release(self, tasks: list) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.store.flush()
        finally:
            self.store.close()
            await self.transport.close()

    @property
    def in_flight(self) -> int:
        return self.limits.in_flight

    # -- the public API -------------------------------------------------------------------------

    async def complete(self, body: dict, kind: str = "chat", id=None) -> Result:
        """Send one request (or answer it from the store) and return its Result.

        body: an OpenAI request body, passed through as is (model included).
        kind: 'chat' for /chat/completions, 'completion' for /completions.
        The Result carries the parsed reply (`.response`, `.unwrap()`), or `.error` if it failed for
        good after retries. Concurrent calls share the limits; identical ones are sent once.
        """
        return await self.submit(Request(body, kind, id))

    async def submit(self, request: Request) -> Result:
        """complete() for a ready-made Request."""
        self._usable()
        started = self._start(request)
        if isinstance(started, Result):
            self._count(started)
            return started
        job, shared = started
        try:
            outcome = await asyncio.shield(job.future)
        except asyncio.CancelledError:
            # The caller gave up (a timeout around complete(), a cancelled task): unless another
            # caller waits for it too, a request not sent yet is withdrawn rather than paid for.
            self._leave(job, "withdrawn: the caller was cancelled (not sent, or not sent again)", owner=not shared)
            # Counted when it ends (withdrawn, or finished for another caller), though nobody reads it.
            job.future.add_done_callback(lambda fut: self._count(self._result(request, fut.result(), shared, job)))
            raise
        result = self._result(request, outcome, shared, job)
        self._count(result)
        return result

    async def run_many(self, requests: Iterable[Request], progress: bool = False) -> list[Result]:
        """All results, in input order; see stream(). Raises RunAborted if the run had to stop."""
        requests = list(requests)
        positions: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            positions.setdefault(id(r), []).append(i)
        out: list[Result | None] = [None] * len(requests)
        async for result in self.stream(requests, progress=progress):
            out[positions[id(result.request)].pop()] = result
        return out  # type: ignore[return-value]

    async def stream(self, requests: Iterable[Request], progress: bool = False) -> AsyncIterator[Result]:
        """Yield one Result per request, in completion order. The input is read lazily, a bounded
        number ahead of dispatch, so a generator of millions of requests is fine. After stop() the
        rest are yielded as 'interrupted'. Raises RunAborted at the end if the run had to stop.

        Leaving the loop early (break, an exception, closing the generator) reads no more input and
        withdraws the requests it fed that are not sent yet (unless another caller waits for the
        same request); those in flight finish and are stored. Python closes an async generator when
        it is dropped: one kept in a variable must be closed (`async with
        contextlib.aclosing(client.stream(...)) as results:`). An error of the input iterator is
        raised as soon as it happens, withdrawing the same way."""
        self._usable()
        out: deque[Result] = deque()
        has_out = asyncio.Event()
        state = {"pending": 0, "fed": False}
        waiting: dict[int, _Job] = {}  # jobs fed and not finished, by id(): withdrawn if the caller leaves
        owned: set[int] = set()        # of those, the ones this stream started (not shared from another caller)

        def deliver(result: Result) -> None:
            self._count(result)
            out.append(result)
            has_out.set()

        def on_done(request: Request, job: _Job, shared: bool, fut: asyncio.Future) -> None:
            state["pending"] -= 1
            waiting.pop(id(job), None)
            owned.discard(id(job))  # ids are reused once a job is gone
            deliver(self._result(request, fut.result(), shared, job))

        async def feed() -> None:
            try:
                for n, request in enumerate(requests):
                    while len(self._fresh) >= self._watermark and not self.stopped:
                        self._room.clear()
                        await self._room.wait()
                    started = self._start(request)
                    if isinstance(started, Result):
                        deliver(started)
                    else:
                        job, shared = started
                        state["pending"] += 1
                        if id(job) in waiting:  # the same request twice in this stream: one waiter is enough
                            job.waiters -= 1
                        waiting[id(job)] = job
                        if not shared:
                            owned.add(id(job))
                        job.future.add_done_callback(lambda fut, r=request, j=job, s=shared: on_done(r, j, s, fut))
                    if n % 256 == 255:
                        await asyncio.sleep(0)  # store look-ups are synchronous: let replies in
            finally:
                state["fed"] = True
                has_out.set()

        feeder = asyncio.create_task(feed(), name="client-feeder")
        bar = None
        if progress:
            from client.progress import Progress
            total = len(requests) if hasattr(requests, "__len__") else None
            bar = Progress(self, total)
            bar.start()
        try:
            while True:
                while out:
                    yield out.popleft()
                if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
                    # The input failed: raised now (the finally withdraws what is not sent yet),
                    # not after everything read before the error was sent and paid for.
                    raise feeder.exception()
                if state["fed"] and state["pending"] == 0:
                    break
                has_out.clear()
                await has_out.wait()
        finally:
            if not feeder.done():
                feeder.cancel()
            elif not feeder.cancelled():
                feeder.exception()  # retrieved: a caller who left early gets no "never retrieved" report
            for job in list(waiting.values()):  # empty unless the caller left early
                self._leave(job, "withdrawn: the caller stopped reading the stream (not sent, or not sent again)",
                            owner=id(job) in owned)
            if bar is not None:
                bar.close()
        if self.abort_reason:
            raise RunAborted(self.abort_reason)

    # -- admission ------------------------------------------------------------------------------

    def _start(self, request: Request) -> Result | tuple[_Job, bool]:
        """A Result at once (store, stopped) or the job to wait on, and whether it is shared."""
        self.stats.submitted += 1
        key = request.key
        job = self._jobs.get(key)
        if job is not None:
            job.waiters += 1
            return job, True
        stored = self.store.get(key)
        if stored is not None:
            return Result(request, raw=stored.response, source="store",
                          usage=Usage(stored.prompt_tokens, stored.completion_tokens), cost=0.0)
        dead = self.store.get_dead(key)
        if dead is not None and not self.config.retry_dead_letters:
            return Result(request, error=RequestError(dead.error_type, dead.message, dead.status), source="store")
        if self.stopped:
            reason = self.abort_reason or "not sent: the run was stopped"
            return Result(request, error=RequestError("interrupted", reason, stopped=True), source="unsent")
        job = _Job(request, asyncio.get_running_loop())
        job.was_dead = dead is not None
        self._estimate(job)
        self._jobs[key] = job
        self._fresh.append(job)
        self._ready.set()
        return job, False

    def _estimate(self, job: _Job) -> None:
        # Prompt tokens from characters at a ratio learned from usage (4 until a reply says better),
        # plus the completion budget that a TPM limiter charges up front: max_tokens per choice.
        body = job.body
        job.chars = prompt_chars(job.kind, body)
        prompts = prompt_count(job.kind, body)
        overhead = 3 + 4 * len(body.get("messages") or ()) if job.kind == "chat" else prompts
        job.prompt_est = math.ceil(job.chars / self._chars_per_token) + overhead
        budget = max_completion_tokens(body)
        job.has_budget = budget is not None
        if budget is None:
            budget = self._chat_completion if job.kind == "chat" else 16  # /completions defaults to 16
        choices = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        best_of = body.get("best_of")  # /completions generates (and bills) best_of, returns n of them
        if job.kind == "completion" and isinstance(best_of, int) and not isinstance(best_of, bool):
            choices = max(choices, best_of)
        # Capped (a max_tokens of 10**400 would overflow the limiter's float arithmetic): far above
        # any per-minute limit, so such a request still waits for an empty window and goes alone.
        job.completion_est = float(min(max(budget, 0) * choices * prompts, MOST_TOKENS))

    def _learn_usage(self, job: _Job, usage: Usage) -> None:
        if usage.prompt_tokens <= 0:
            return
        correction = job.prompt_est - usage.prompt_tokens
        if not job.has_budget:
            correction += job.completion_est - usage.completion_tokens
            if job.kind == "chat":
                self._chat_completion = 0.9 * self._chat_completion + 0.1 * max(1, usage.completion_tokens)
        self.limits.give_back_tokens(correction)
        overhead = 3 + 4 * len(job.body.get("messages") or ()) if job.kind == "chat" else 1
        text_tokens = usage.prompt_tokens - overhead
        if job.chars > 0 and text_tokens > 0:
            ratio = min(8.0, max(1.0, job.chars / text_tokens))
            self._chars_per_token = 0.9 * self._chars_per_token + 0.1 * ratio

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        try:
            await self._dispatch_loop()
        except Exception as exc:  # a bug must not leave the run waiting forever with nothing in flight
            self._internal_error(exc)

    async def _dispatch_loop(self) -> None:
        while not self.stopped:
            if not (self._retry or self._fresh):
                self._ready.clear()
                await self._ready.wait()
                continue
            head = self._retry[0] if self._retry else self._fresh[0]
            await self.limits.acquire(head.tokens_est)
            if self.stopped or not (self._retry or self._fresh):  # stopped (queue emptied) while waiting
                self.limits.release()
                continue
            job = self._retry.popleft() if self._retry else self._fresh.popleft()
            if len(self._fresh) < self._watermark:
                self._room.set()
            if self.config.max_cost is not None and not self._affordable(job):
                self.limits.release()
                self._interrupt(job, self.abort_reason)
                return
            now = time.monotonic()
            if job.first_sent is None:
                job.first_sent = now
                wall = time.time()
                self.stats.last_first_attempt_wall = wall
                if self.stats.first_sent_wall is None:
                    self.stats.first_sent_wall = wall
            job.sent_at = now
            if self._silent_since is None:
                self._silent_since = now
            job.attempting = True
            task = asyncio.create_task(self._attempt(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _affordable(self, job: _Job) -> bool:
        """Whether sending `job` keeps this run within max_cost even if every request in flight and
        it cost their most; if not, stops the run saying so. Counts it in flight if it does."""
        cost = self.config.prices.cost(job.model, Usage(math.ceil(job.prompt_est), math.ceil(job.completion_est)))
        cost = cost or 0.0
        spent = self.stats.cost
        if spent + self._in_flight_cost + cost > self.config.max_cost:
            self._abort(f"--max-cost ${self.config.max_cost:g} reached: ${spent:.4f} spent and ${self._in_flight_cost:.4f} "
                        f"in flight, and the next request may cost ${cost:.4f}; replies received are kept: raise "
                        "--max-cost and run the same command again to continue")
            return False
        job.cost_est = cost
        self._in_flight_cost += cost
        return True

    async def _attempt(self, job: _Job) -> None:
        try:
            await self._attempt_once(job)
        except asyncio.CancelledError:
            self._interrupt(job, "cancelled in flight by the stop (it may have been paid; a rerun sends it again)")
            raise
        except Exception as exc:  # a bug must not leave a caller waiting forever, nor print a traceback
            what = self._internal_error(exc)
            self._finish(job, _Outcome(None, Usage(), None, RequestError("internal", what), job.attempts))
        finally:
            # Held until the attempt's cost, if any, is in stats.cost (after the store's write).
            self._in_flight_cost -= job.cost_est
            job.cost_est = 0.0
            job.attempting = False
            if job.waiters <= 0:  # every caller left while it was out: not sent again for nobody
                self._withdraw(job)

    def _internal_error(self, exc: Exception) -> str:
        """Stop the run for a bug, naming it (one line); returns that name."""
        what = " ".join(f"{type(exc).__name__}: {exc}".split())
        self._abort(f"internal error ({what}); finished requests are kept: run the same command again to "
                    "resume, and please report this")
        return what

    async def _attempt_once(self, job: _Job) -> None:
        job.attempts += 1
        self.stats.attempts += 1
        try:
            try:
                reply = await self.transport.post(job.kind, job.payload)
            finally:
                self.limits.release()
        except TransportError as exc:
            self.limits.on_trouble(job.sent_at)
            # A server that answers nobody is down, and that is no fault of this request: such
            # failures do not count against --max-attempts (the silence below ends the run). One
            # that answers others but not this request counts. When nothing was answered since this
            # attempt left, and no other request failed meanwhile (it is alone, or always the one
            # that fails: a reset on arrival, a reply slower than --timeout), GET /models tells:
            # if the server answers that, the failure counts, so that such a request is
            # dead-lettered rather than stopping every run on silence.
            up = self._last_reply >= job.sent_at
            if not up and exc.reached:
                if job.counted == 0:
                    self._silent_keys.add(job.key)
                if self._silent_keys <= {job.key}:
                    up = await self._server_answers()
            if not up:
                self._outage = True
                now = time.monotonic()
                quiet_from = self._last_reply if self._silent_since is None else self._silent_since
                if now - quiet_from >= self.config.unreachable_s:
                    self._abort(f"no reply from {self.transport.base_url} for {now - quiet_from:.0f} s "
                                f"({exc.message}); check the server, then run the same command again to resume")
            await self._retry_or_fail(job, RequestError(exc.type, exc.message, retryable=True), None, exc.type,
                                      counts=up)
            return
        self._heard(time.monotonic())
        self.limits.on_headers(reply.headers)
        verdict = classify(job.kind, job.body, reply)
        if verdict.response is not None:
            await self._succeed(job, reply.body, verdict.response)
            self._check_pause()
            return
        error = verdict.error
        if error.type == "quota":
            self.limits.on_other()
            self._abort(f"the server refused the request with {reply.status} ({error.message}): the account's "
                        "quota is spent; add credit or raise the limit, then run the same command again to resume")
            self._interrupt(job, self.abort_reason, error.type, reply.status)
            return
        if reply.status == 429:
            self.limits.on_429(reply.headers, job.sent_at)
        elif error.retryable and (reply.status >= 500 or reply.status == 408):
            self.limits.on_trouble(job.sent_at, verdict.retry_after)
        else:
            self.limits.on_other()
            if 400 <= reply.status < 500:
                # Refused before anything was generated: the completion budget charged up front
                # was not spent (a max_tokens far beyond the model's, refused with a 400, must not
                # hold back the requests after it).
                self.limits.give_back_tokens(job.completion_est)
        if error.type == "auth":
            self._abort(f"the server refused the request with {reply.status} ({error.message}): "
                        + ("check the API key (OPENAI_API_KEY or --api-key)" if self.config.api_key
                           else "no API key was sent; set OPENAI_API_KEY or pass --api-key"))
            self._interrupt(job, self.abort_reason, error.type, reply.status)
            return
        self._check_pause()
        cause = str(reply.status) if error.type == "http" else error.type
        await self._retry_or_fail(job, error, verdict.retry_after, cause)

    def _heard(self, when: float) -> None:
        """The server replied (at `when`). After an outage, the requests backing off because of it
        go again now rather than after backoffs that doubled while nobody answered."""
        self._last_reply = max(self._last_reply, when)
        self._silent_since = None
        self._silent_keys.clear()
        if self._outage:
            self._outage = False
            for job in [job for job in self._waiting if job.outage]:
                if job.timer is not None:
                    job.timer.cancel()
                self._requeue(job)

    async def _server_answers(self) -> bool:
        """Whether GET /models gets any reply now (one probe at a time, reused for PROBE_EVERY_S)."""
        if self._probe is None or (self._probe.done() and time.monotonic() - self._probe_done >= PROBE_EVERY_S):
            self._probe = asyncio.create_task(self._run_probe(), name="client-probe")
        return await asyncio.shield(self._probe)

    async def _run_probe(self) -> bool:
        # Its answer is no completion: it neither ends the silence nor an outage.
        try:
            return await self.transport.answers(min(PROBE_TIMEOUT_S, self.config.timeout_s))
        finally:
            self._probe_done = time.monotonic()

    def _check_pause(self) -> None:
        """A pause as long as the per-request deadline (a Retry-After of hours, a limit reset far
        away) would leave the run waiting silently and then send nothing in time: stop instead,
        saying when to come back. What is in flight finishes; the rest is resumed by a rerun."""
        pause = self.limits.paused_for()
        if pause >= self.config.deadline_s and self.abort_reason is None:
            until = _when(pause)
            length = f"{pause:.0f}" if pause < 1e9 else f"{pause:.3g}"
            self._abort(f"the server asks for a pause of {length} s ({self.limits.pause_reason}), longer than "
                        f"the per-request deadline ({self.config.deadline_s:g} s, --deadline): stopped; run the "
                        f"same command again after {until} to resume")

    async def _succeed(self, job: _Job, raw: bytes, response: dict) -> None:
        self.limits.on_success(job.sent_at)
        usage = Usage.from_reply(response)
        self._learn_usage(job, usage)
        cost = self.config.prices.cost(job.model, usage)
        try:
            # Stored before reported: once the caller sees it, no crash can make us pay for it again.
            await self.store.put_result(job.key, job.kind, job.model, raw, usage.prompt_tokens,
                                        usage.completion_tokens, cost, job.attempts, job.was_dead)
        except StoreError as exc:
            self._abort(str(exc))
            self._finish(job, _Outcome(None, Usage(), None, RequestError("store", str(exc)), job.attempts))
            return
        stats = self.stats
        stats.sent_ok += 1
        stats.prompt_tokens += usage.prompt_tokens
        stats.completion_tokens += usage.completion_tokens
        if cost is None:
            stats.unpriced[job.model] += 1
        else:
            stats.cost += cost
        self._finish(job, _Outcome(raw, usage, cost, None, job.attempts))

    async def _retry_or_fail(self, job: _Job, error: RequestError, retry_after: float | None, cause: str,
                             counts: bool = True) -> None:
        now = time.monotonic()
        if error.retryable:
            if self.stopped:
                self._interrupt(job, f"not retried: the run was stopped (last error: {error})")
                return
            if cause == "429":
                delay = 0.0  # the dispatcher is paused for the server's Retry-After already
            else:
                job.failures += 1
                job.counted += counts
                job.outage = not counts
                ceiling = min(self.config.backoff_cap_s, self.config.backoff_base_s * 2 ** (job.failures - 1))
                delay = self._rng.uniform(0, ceiling)  # full jitter: retries of a burst spread out
                if retry_after:
                    delay = max(delay, retry_after)
            elapsed = now - job.first_sent
            in_time = elapsed + delay + self.limits.paused_for() < self.config.deadline_s
            if job.counted < self.config.max_attempts and in_time:
                self.stats.retries[cause] += 1
                if delay <= 0:
                    self._requeue(job)
                else:
                    self._waiting.add(job)
                    job.timer = asyncio.get_running_loop().call_later(delay, self._requeue, job)
                return
            why = "attempts" if job.counted >= self.config.max_attempts else "deadline"
            error = RequestError(error.type, f"gave up after {job.attempts} attempts in {elapsed:.0f} s "
                                 f"({'max attempts' if why == 'attempts' else 'deadline'}): {error.message}",
                                 error.status, retryable=True)  # transient: a later run may succeed
        try:
            await self.store.put_dead(job.key, job.kind, job.body, error.type, error.status, error.message,
                                      job.attempts)
        except StoreError as exc:
            self._abort(str(exc))
        self.stats.dead_lettered += 1
        self.stats.errors[str(error)[:160]] += 1
        self._finish(job, _Outcome(None, Usage(), None, error, job.attempts))

    def _requeue(self, job: _Job) -> None:
        job.timer = None
        self._waiting.discard(job)
        if self.stopped:
            self._interrupt(job, "not retried: the run was stopped")
            return
        self._retry.append(job)
        self._ready.set()

    # -- endings --------------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
        self.stop(reason=reason)

    def _interrupt(self, job: _Job, message: str, type: str = "interrupted", status: int | None = None) -> None:
        """End `job` unfinished, not dead-lettered (a rerun sends it); `type` 'auth' or 'quota' for the
        request whose refusal stopped the run."""
        if not job.future.done():
            error = RequestError(type, message, status, stopped=True)
            self._finish(job, _Outcome(None, Usage(), None, error, job.attempts))

    def _leave(self, job: _Job, message: str, owner: bool) -> None:
        """A caller stopped waiting for `job` (`owner`: the one it was started for): if none waits
        any more, it is withdrawn (now if it is queued or backing off, else once its attempt has
        been handled); if others do, the first of them to get its result gets it as 'sent'."""
        job.waiters -= 1
        if job.waiters <= 0:
            job.left = message
            self._withdraw(job)
        elif owner:
            job.orphan = True

    def _withdraw(self, job: _Job) -> None:
        """Take an abandoned job out of the queues and end it unsent, unless an attempt of it is out
        (its reply is stored, and then it is withdrawn) or it is finished."""
        if job.attempting or job.future.done():
            return
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        self._waiting.discard(job)
        for queue in (self._fresh, self._retry):
            try:
                queue.remove(job)
            except ValueError:
                pass
        if len(self._fresh) < self._watermark:
            self._room.set()
        self._interrupt(job, job.left or "withdrawn: no caller waits for it")

    def _finish(self, job: _Job, outcome: _Outcome) -> None:
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        if not job.future.done():
            job.future.set_result(outcome)

    def _result(self, request: Request, outcome: _Outcome, shared: bool, job: _Job | None = None) -> Result:
        if shared and job is not None and job.orphan:
            job.orphan = False
            shared = False  # the caller it was started for left: it was sent for this one (attempts, cost)
        if shared:
            return Result(request, raw=outcome.raw, error=outcome.error, source="shared", usage=outcome.usage,
                          cost=0.0 if outcome.cost is not None else None)
        return Result(request, raw=outcome.raw, error=outcome.error, source="sent" if outcome.attempts else "unsent",
                      attempts=outcome.attempts, usage=outcome.usage, cost=outcome.cost)

    def _count(self, result: Result) -> None:
        stats = self.stats
        if result.error is None:
            stats.ok += 1
        else:
            stats.failed += 1
            stats.interrupted += result.error.stopped
        if result.source == "store":
            stats.from_store += 1
            stats.from_store_failed += result.error is not None
        elif result.source == "shared":
            stats.shared += 1
