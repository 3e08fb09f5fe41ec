"""When the next request may leave: requests and tokens per minute, requests in flight, and pauses.

Providers enforce per-minute limits over short windows (a second or less), so a client that spends
a minute's budget at once is refused for most of it. Here every budget is a token bucket that refills
continuously and holds only `burst_s` seconds of budget: requests leave evenly spaced, and a late
wakeup can catch up by a few requests but never by a minute's worth.

The buckets start from the user's --rpm/--tpm, and x-ratelimit-* headers lower them (a server knows
its own limit better than the user does; a user may keep a lower one on purpose to share a key). A
429 pauses every dispatch until the server's Retry-After, not just the request that got it. The cap
on requests in flight moves by AIMD: each success adds 1/limit (one per round of the window), and an
overload signal halves it, once per round trip: only a reply to a request sent after the last
decrease may decrease again, as in TCP.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

INF = math.inf
MIN_SLEEP_S = 0.005
# The server is judged overloaded when replies in trouble (5xx, timeouts, resets) reach 30 of the
# last 100, or 10 of the last 20 (a quick verdict on a server that refuses half of everything).
# Random faults at a 10% rate get there with odds below 1e-6 per reply, so they are retried
# without slowing anyone down.
TROUBLE_RULES = ((100, 30), (20, 10))


def parse_duration(text: str | None) -> float | None:
    """Seconds in an x-ratelimit-reset-* value: '1s', '6m0s', '20ms', '1h2m3.5s', or a bare number."""
    if not text:
        return None
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, value) if math.isfinite(value) else None
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        if m.start() != pos:
            return None
        pos = m.end()
        total += float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    return total if pos == len(text) and pos > 0 else None


def parse_retry_after(headers: Mapping[str, str], now_wall: float | None = None) -> float | None:
    """Seconds to wait from retry-after-ms, else Retry-After (seconds or an HTTP date); None if absent
    or not a finite time."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            seconds = float(ms) / 1000.0
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return max(0.0, seconds)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now_wall = time.time() if now_wall is None else now_wall
    return max(0.0, when.timestamp() - now_wall)


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) else None


WINDOW_S = 1.0
"""The shortest window a provider is assumed to enforce a per-minute limit over."""
HOLD_S = WINDOW_S + 0.02
"""How long a request larger than the burst is counted in its window: 20 ms longer, so that requests
sent a window apart still are when the network brings them closer (smaller requests are paced by
the bucket alone, whose 1% headroom leaves the same slack)."""


@dataclass
class TokenBucket:
    """A budget of `rate` units a second of which at most `burst` can be saved up (rate inf: no limit).

    The bucket alone keeps any window of T seconds within rate * T + burst for requests that cost
    no more than the burst. A larger request (a TPM limit and a long prompt or max_tokens) would
    overrun a window even when paced evenly, so what was spent in the last `HOLD_S` is kept too and
    such a request also waits until that window has room for it."""

    rate: float
    """Units per second (requests or tokens); inf when there is no limit."""
    burst: float
    """Most units that can be spent back to back."""
    level: float
    """Units available now (negative: debt from a request larger than the burst)."""
    stamp: float
    """When `level` was last brought up to date (monotonic seconds)."""
    spent: deque = field(default_factory=deque)
    """(time, units) of what was taken in the last HOLD_S, also while no limit is known."""
    spent_sum: float = 0.0

    @classmethod
    def per_minute(cls, per_minute: float | None, burst_s: float, now: float) -> "TokenBucket":
        rate = INF if per_minute is None else per_minute / 60.0
        burst = INF if rate == INF else max(1.0, rate * burst_s)
        return cls(rate=rate, burst=burst, level=burst, stamp=now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            if self.rate != INF:
                self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def _trim(self, now: float) -> None:
        while self.spent and self.spent[0][0] <= now - HOLD_S + 1e-9:  # (rounding of t + HOLD_S)
            self.spent_sum -= self.spent.popleft()[1]
        if not self.spent:
            self.spent_sum = 0.0

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until `cost` units may be spent (a cost above the burst waits for a full bucket,
        one above a window's budget for an empty window)."""
        if self.rate == INF:
            return 0.0
        self._refill(now)
        need = min(cost, self.burst)
        wait = 0.0 if self.level >= need - 1e-9 else (need - self.level) / self.rate  # (rounding)
        self._trim(now)
        budget = self.rate * WINDOW_S + self.burst
        if cost > self.burst and self.spent_sum + cost > budget:
            left = self.spent_sum
            for t, units in self.spent:
                left -= units
                if left + cost <= budget or left <= 1e-9:
                    wait = max(wait, t + HOLD_S - now)
                    break
        return wait

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        if self.rate != INF:
            # No deeper than a minute's budget: a request estimated above it (max_tokens far
            # beyond any limit, which the server refuses or charges as used) must not hold back
            # every request after it for hours.
            self.level = max(self._floor(), self.level - cost)
        self._trim(now)
        self.spent.append((now, cost))
        self.spent_sum += cost

    def _floor(self) -> float:
        """The deepest debt believed from a server's word: a minute's budget. A reply's usage or a
        remaining count can be absurd (1e15 tokens for one reply); a minute's wait makes up for
        any plausible overspend (the limits are per minute), and more would stall the run with
        nothing said."""
        return -(self.rate * 60.0 + self.burst)

    def give_back(self, units: float) -> None:
        """Correct an estimate: positive units return budget, negative ones charge more."""
        if self.rate != INF:
            self.level = max(self._floor(), min(self.burst, self.level + units))

    def cap(self, units: float, now: float) -> None:
        """Never believe there is more budget than the server says remains."""
        self._refill(now)
        self.level = min(self.level, max(units, self._floor()))

    def drain(self, now: float, until: float) -> None:
        """For a pause until `until`: nothing accrues before then, so that dispatch resumes paced
        from an empty bucket, not in a burst."""
        self._refill(now)
        self.level = min(self.level, 0.0)
        self.stamp = max(self.stamp, until)

    def set_per_minute(self, per_minute: float, burst_s: float, now: float) -> None:
        self._refill(now)
        before = self.rate
        self.rate = per_minute / 60.0
        self.burst = max(1.0, self.rate * burst_s)
        self.level = min(self.level, self.burst)
        if self.rate < before:
            # What went out under the higher (or unknown) limit, the probe included, counts
            # against the lower one.
            self._trim(now)
            self.level = min(self.level, self.burst - self.spent_sum)


class Limits:
    """Decides when the next request may be sent; fed back by every reply.

    One dispatcher calls `acquire` for each request in turn (so one waiter at a time: no thundering
    herd); each finished attempt calls `release`, then reports what came back: `on_headers` for any
    reply, and one of `on_success`, `on_429`, `on_trouble` (5xx, timeouts, resets) or `on_other`.
    """

    def __init__(self, *, rpm: float | None = None, tpm: float | None = None, max_in_flight: int = 512,
                 headroom: float = 0.99, burst_s: float = 0.01, learn_from_headers: bool = True,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0,
                 clock=time.monotonic):
        self.clock = clock
        now = clock()
        self.headroom = headroom
        self.burst_s = burst_s
        self.learn = learn_from_headers
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.user_rpm, self.user_tpm = rpm, tpm
        self.requests = TokenBucket.per_minute(None if rpm is None else rpm * headroom, burst_s, now)
        self.tokens = TokenBucket.per_minute(None if tpm is None else tpm * headroom, burst_s, now)
        self.max_in_flight = max_in_flight
        self.window = float(max_in_flight)
        self.in_flight = 0
        self.pause_until = 0.0
        self.pause_reason = ""
        self.last_decrease = -INF
        self.decreases = 0  # how often the in-flight cap was halved
        self.consecutive_429 = 0
        self.last_429 = -INF  # when the latest 429 came back
        self._recent_trouble: deque[bool] = deque(maxlen=max(n for n, _ in TROUBLE_RULES))
        # With a limit unknown, one request goes alone first: its x-ratelimit-* headers then set the
        # pace before anything else is sent, instead of a burst that the server refuses. Requests
        # go one at a time until a reply says something: limit headers or a success (a server
        # without them); an error page, a reset or a 429 without headers does not.
        self.probing = learn_from_headers and (rpm is None or tpm is None)
        self._changed = asyncio.Event()

    # -- dispatch -------------------------------------------------------------------------------

    def delay(self, tokens: float) -> float | None:
        """Seconds to wait before a request of `tokens` may leave; 0 to go now; None to wait for a
        slot to free (a request in flight to finish)."""
        now = self.clock()
        if self.pause_until > now:
            return self.pause_until - now
        if self.in_flight >= (1 if self.probing else max(1, int(self.window))):
            return None
        return max(self.requests.wait_time(1, now), self.tokens.wait_time(tokens, now))

    async def acquire(self, tokens: float) -> None:
        """Wait until a request of about `tokens` tokens may leave, then count it as in flight."""
        while True:
            wait = self.delay(tokens)
            if wait == 0:
                break
            self._changed.clear()
            if wait is None:
                await self._changed.wait()
            elif wait > 0.05:
                # A long wait (a pause): wake early if something changes. Not wait_for: on Python
                # 3.11 it returns the event's result and swallows a cancel that arrives in the tick
                # the event is set (a stop right after the reply that paused), and the dispatcher
                # would then wait out the whole pause. asyncio.wait lets the cancel through.
                waiter = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait({waiter}, timeout=wait)
                finally:
                    waiter.cancel()
            else:
                # Sleep at least a few ms and then send what has accrued back to back: at hundreds
                # of requests a second this wakes the loop far less often, still well within the
                # burst (burst_s) and far finer than any provider's window.
                await asyncio.sleep(max(wait, MIN_SLEEP_S))
        self.take(tokens)

    def take(self, tokens: float) -> None:
        """Count a request of about `tokens` tokens as sent now (what `acquire` ends with)."""
        now = self.clock()
        self.requests.take(1, now)
        self.tokens.take(tokens, now)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._changed.set()

    def wake(self) -> None:
        """Let a waiting dispatcher look again (used when the client stops)."""
        self._changed.set()

    # -- feedback -------------------------------------------------------------------------------

    def on_headers(self, headers: Mapping[str, str]) -> None:
        """Learn from x-ratelimit-* headers (sent with successes and refusals alike)."""
        self._changed.set()
        if not self.learn:
            return
        now = self.clock()
        pairs = ((self.requests, self.user_rpm, "requests"), (self.tokens, self.user_tpm, "tokens"))
        for bucket, user, suffix in pairs:
            limit = _int_header(headers, f"x-ratelimit-limit-{suffix}")
            if limit and limit > 0:
                self.probing = False
            if limit and limit > 0 and (user is None or limit < user):
                target = limit * self.headroom / 60.0
                if abs(bucket.rate - target) > 1e-9:
                    bucket.set_per_minute(limit * self.headroom, self.burst_s, now)
            remaining = _int_header(headers, f"x-ratelimit-remaining-{suffix}")
            if remaining is None:
                continue
            if bucket.rate != INF:
                # The bucket then refills at the known rate: no need to wait for a full reset.
                bucket.cap(remaining, now)
            elif remaining <= 0:
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{suffix}"))
                if reset:
                    self.pause(reset, f"no {suffix} left")

    def pause(self, seconds: float, reason: str) -> None:
        """Stop all dispatch for `seconds` (extends, never shortens, a pause already set)."""
        now = self.clock()
        if now + seconds > self.pause_until:
            self.pause_until = now + seconds
            self.pause_reason = reason
            self.requests.drain(now, self.pause_until)
            self.tokens.drain(now, self.pause_until)
            self._changed.set()

    def on_success(self, sent_at: float) -> None:
        if sent_at < self.last_429:
            # Sent before the latest refusal (the one request of a burst the server let through):
            # it says nothing of the server now, so it neither ends a probe nor resets the backoff.
            self._recent_trouble.append(False)
            return
        self.probing = False
        self.consecutive_429 = 0
        self._recent_trouble.append(False)
        if self.window < self.max_in_flight:
            self.window = min(float(self.max_in_flight), self.window + 1.0 / self.window)
            self._changed.set()

    def on_429(self, headers: Mapping[str, str], sent_at: float) -> float:
        """A refusal: pause everyone for the server's Retry-After (or a growing backoff without
        one) and halve the in-flight cap. Returns the pause in seconds. With no limit known (none
        given, none in the headers), requests then go one at a time until one succeeds: after the
        pause, all those waiting would otherwise go at once and be refused together."""
        self.probing = self.learn and self.requests.rate == INF and self.tokens.rate == INF
        if sent_at > self.last_429:  # once per round trip: the refusals of one burst are one 429
            self.consecutive_429 += 1
        self.last_429 = self.clock()
        wait = parse_retry_after(headers)
        if wait is None:  # no Retry-After: the reset time of an exhausted limit, if the server says
            # (a limit whose remaining count is not given may be the exhausted one)
            resets = [parse_duration(headers.get(f"x-ratelimit-reset-{name}")) for name in ("requests", "tokens")
                      if _int_header(headers, f"x-ratelimit-remaining-{name}") in (0, None)]
            wait = max((r for r in resets if r), default=None)
        if not wait or wait <= 0:  # none, or "Retry-After: 0": a pause of nothing would hammer the server
            wait = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (self.consecutive_429 - 1))
        self.pause(wait, "429 from the server")
        self._decrease(sent_at)
        return wait

    def on_trouble(self, sent_at: float, retry_after: float | None = None) -> None:
        """A 5xx, timeout or connection failure. Random faults are retried without slowing down;
        when TROUBLE_RULES find the server overloaded, halve what is actually in flight, then judge
        afresh on new replies. (A probe goes on: the next request goes alone too.)"""
        recent = self._recent_trouble
        recent.append(True)
        if retry_after:
            self.pause(retry_after, "server asked to retry later")
        if any(len(recent) >= n and sum(itertools.islice(reversed(recent), n)) >= k for n, k in TROUBLE_RULES):
            if sent_at > self.last_decrease:
                # From the load actually offered: halving a cap far above it would change nothing.
                self.window = min(self.window, self.in_flight + 1.0)
                self._decrease(sent_at)
            recent.clear()

    def on_other(self) -> None:
        """A reply that says nothing about load (a 4xx other than 429, a bad body); a probe goes on."""
        self._changed.set()

    def _decrease(self, sent_at: float) -> None:
        # Once per round trip: replies to requests sent before the last decrease say nothing new.
        if sent_at > self.last_decrease:
            self.window = max(1.0, self.window / 2.0)
            self.last_decrease = self.clock()
            self.decreases += 1

    def give_back_tokens(self, units: float) -> None:
        self.tokens.give_back(units)

    def paused_for(self) -> float:
        return max(0.0, self.pause_until - self.clock())

    @property
    def rpm(self) -> float | None:
        """Requests per minute being paced to (None: no limit known)."""
        return None if self.requests.rate == INF else self.requests.rate * 60.0

    @property
    def tpm(self) -> float | None:
        return None if self.tokens.rate == INF else self.tokens.rate * 60.0

    @property
    def concurrency(self) -> int:
        """The current cap on requests in flight."""
        return 1 if self.probing else max(1, int(self.window))
