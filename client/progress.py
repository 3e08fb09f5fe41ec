"""What a long run shows while it runs, and the paragraph it ends with.

The display samples the client's counters twice a second instead of being told about every reply,
so it costs the same at 10 requests a minute as at 30,000. On a terminal it is a tqdm bar; otherwise
(a log file, CI) one line every `log_every_s` seconds.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque


def human(n: float) -> str:
    """1234 -> '1,234'; 1234567 -> '1.23M'."""
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n:,.0f}"


def money(x: float) -> str:
    return f"${x:,.4f}" if x < 1 else f"${x:,.2f}"


def duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Shows done, failed, in flight, requests/min, tokens/min, ETA and cost of a running Client."""

    def __init__(self, client, total: int | None, *, file=None, mode: str = "auto", interval_s: float = 0.5,
                 log_every_s: float = 10.0, label: str = "requests"):
        self.client = client
        self.total = total
        self.file = file or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.file, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.interval_s = interval_s
        self.log_every_s = log_every_s
        self.label = label
        self._samples: deque[tuple[float, int, int]] = deque()
        self._task: asyncio.Task | None = None
        self._bar = None
        self._last_log = time.monotonic()

    def start(self) -> None:
        if self.mode == "off":
            return
        if self.mode == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, unit="req", file=self.file, dynamic_ncols=True,
                             desc=self.label, smoothing=0.05, mininterval=self.interval_s)
        self._task = asyncio.create_task(self._loop(), name="client-progress")

    def write(self, line: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.update()

    def rates(self) -> tuple[float, float]:
        """Requests and tokens per minute over the last 20 seconds."""
        s = self.client.stats
        now = time.monotonic()
        self._samples.append((now, s.done, s.prompt_tokens + s.completion_tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > 20:
            self._samples.popleft()
        t0, d0, k0 = self._samples[0]
        span = now - t0
        if span <= 0:
            return 0.0, 0.0
        return (s.done - d0) * 60 / span, (s.prompt_tokens + s.completion_tokens - k0) * 60 / span

    def status(self) -> str:
        s, c = self.client.stats, self.client
        rpm, tpm = self.rates()
        parts = [f"{human(s.ok)} done", f"{human(s.failed - s.interrupted)} failed", f"{c.in_flight} in flight",
                 f"{human(rpm)} req/min", f"{human(tpm)} tok/min"]
        if self.total and rpm > 0:
            parts.append(f"ETA {duration((self.total - s.done) * 60 / rpm)}")
        parts.append(money(s.cost) + ("+?" if s.unpriced else ""))
        paused = c.limits.paused_for()
        if paused > 0.5:
            parts.append(f"paused {paused:.0f}s ({c.limits.pause_reason})")
        return ", ".join(parts)

    def update(self) -> None:
        if self._bar is not None:
            self._bar.n = self.client.stats.done
            self._bar.set_postfix_str(self.status(), refresh=False)
            self._bar.refresh()
        elif self.mode == "log":
            if time.monotonic() - self._last_log >= self.log_every_s:
                self._last_log = time.monotonic()
                total = f"/{human(self.total)}" if self.total else ""
                self.write(f"{self.label}: {human(self.client.stats.done)}{total}: {self.status()}")
            else:
                self.rates()  # a sample every tick, so that the first line's rates cover the run so far

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._bar is not None:
            self._bar.n = self.client.stats.done
            self._bar.refresh()
            self._bar.close()
            self._bar = None


def summary(client, elapsed_s: float, label: str = "batch") -> str:
    """The paragraph a run ends with: outcomes, where the answers came from, retries, tokens, cost."""
    s = client.stats
    out = [f"{label}: {human(s.done)} requests in {duration(elapsed_s)}: {human(s.ok)} completed"]
    sources = []
    if s.sent_ok:
        sources.append(f"{human(s.sent_ok)} sent")
    if s.from_store - s.from_store_failed:
        sources.append(f"{human(s.from_store - s.from_store_failed)} from the store")
    if s.shared:
        sources.append(f"{human(s.shared)} identical to another, sent once")
    if sources:
        out[0] += f" ({', '.join(sources)})"
    out[0] += f", {human(s.failed - s.interrupted)} failed"  # the interrupted are counted apart, below
    if s.from_store_failed:
        out[0] += f" ({human(s.from_store_failed)} dead-lettered earlier, not sent again)"
    out[0] += "."
    if s.dead_lettered:
        top = "; ".join(f"{n} x {msg}" for msg, n in s.errors.most_common(3))
        more = len(s.errors) - 3
        if more > 0:
            top += f"; and {more} more kind{'s' if more > 1 else ''} of error: see `neuronatlas dead-letters`"
        out.append(f"{human(s.dead_lettered)} dead-lettered this run ({top}).")
    if s.interrupted:
        out.append(f"{human(s.interrupted)} not finished (interrupted; a rerun sends them).")
    retries = sum(s.retries.values())
    if retries:
        detail = ", ".join(f"{cause}: {n}" for cause, n in s.retries.most_common())
        out.append(f"{human(retries)} retries ({detail}) over {human(s.attempts)} attempts.")
    if s.sent_ok:
        minutes = max(elapsed_s, 1e-9) / 60
        out.append(f"Tokens paid: {human(s.prompt_tokens)} prompt + {human(s.completion_tokens)} completion "
                   f"({human((s.prompt_tokens + s.completion_tokens) / minutes)}/min, "
                   f"{human(s.sent_ok / minutes)} requests/min); cost {money(s.cost)}"
                   + (f" plus {sum(s.unpriced.values())} replies of unpriced models "
                      f"({', '.join(sorted(map(str, s.unpriced)))}; add them with --prices)" if s.unpriced else "")
                   + ".")
    return " ".join(out)
