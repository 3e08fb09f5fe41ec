"""How the client talks to a server: one dataclass, filled from flags and the usual environment."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from client.prices import PriceTable

OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass
class ClientConfig:
    """Everything a Client needs; the defaults suit a hosted API."""

    base_url: str = OPENAI_BASE_URL
    """The API root, ending in /v1 for OpenAI-compatible servers (vLLM, llama.cpp, Ollama, ...)."""
    api_key: str | None = None
    """Sent as 'Authorization: Bearer KEY'; None sends no Authorization header (local servers)."""
    rpm: float | None = None
    """Requests per minute allowed; None: learn it from x-ratelimit-limit-requests (or no limit)."""
    tpm: float | None = None
    """Tokens per minute allowed; None: learn it from x-ratelimit-limit-tokens (or no limit)."""
    max_in_flight: int = 512
    """Most requests in flight at once; AIMD lowers the working cap on 429s and 5xx storms."""
    timeout_s: float = 120.0
    """Per attempt: a reply not complete within this is abandoned and retried."""
    deadline_s: float = 900.0
    """Per request, from its first attempt: no retry starts after this; it is dead-lettered."""
    max_attempts: int = 10
    """Attempts per request, 429s not counted (they are the server's pacing, bounded by the deadline)."""
    backoff_base_s: float = 0.5
    """First retry waits up to this (full jitter); doubles per attempt."""
    backoff_cap_s: float = 30.0
    """Longest backoff between attempts."""
    headroom: float = 0.99
    """Pace at this fraction of the rate limits, so that clock jitter does not cross them."""
    burst_s: float = 0.01
    """At most this many seconds of budget go back to back (never a minute's worth). With the
    default headroom, rate x 0.99 + rate x 0.01 stays within the limit over any one-second window,
    the shortest that providers enforce a per-minute limit over."""
    learn_from_headers: bool = True
    """Lower the limits from x-ratelimit-* headers (and probe with one request while unknown)."""
    unreachable_s: float = 60.0
    """Stop the run when no HTTP reply at all has come for this long while requests keep failing."""
    store_path: str | None = None
    """The durable request store (SQLite); None keeps nothing between runs."""
    durable: bool = True
    """fsync each group commit (SQLite synchronous=FULL): survives power loss, not only crashes."""
    retry_dead_letters: bool = False
    """Send requests again that an earlier run dead-lettered (default: report their stored error)."""
    prices: PriceTable = field(default_factory=PriceTable)
    """USD per million tokens by model, for the cost figures."""
    max_cost: float | None = None
    """USD this run may spend (by `prices`): no request is sent once what was spent plus the cost of
    the requests in flight and of the next one (prompt estimated, completion at its max_tokens)
    would pass it; the run then stops, as interrupted. None: no ceiling. Unpriced models cost 0."""
    extra_headers: dict[str, str] = field(default_factory=dict)
    """More HTTP headers on every request (e.g. OpenAI-Organization)."""
    seed: int | None = None
    """Seed of the backoff jitter (tests); None: random."""

    @classmethod
    def from_env(cls, **overrides) -> "ClientConfig":
        """Defaults from OPENAI_BASE_URL and OPENAI_API_KEY, then `overrides` (None values ignored)."""
        config = cls(
            base_url=os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL,
            api_key=os.environ.get("OPENAI_API_KEY") or None,
        )
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})

    def problems(self) -> list[str]:
        """What is wrong with this configuration, each as a line naming the fix."""
        out = []
        if not self.base_url.startswith(("http://", "https://")):
            out.append(f"base URL {self.base_url!r} must start with http:// or https:// "
                       "(--base-url or OPENAI_BASE_URL)")
        else:
            from urllib.parse import urlsplit

            try:  # a URL no request could ever reach is a setup error, not an outage to wait out
                parts = urlsplit(self.base_url)
                if not parts.hostname:
                    raise ValueError("no host")
                parts.port  # noqa: B018 - raises for a port out of range or not a number
            except ValueError as exc:
                out.append(f"base URL {self.base_url!r} is not a valid URL ({exc}) (--base-url or OPENAI_BASE_URL)")
        if self.api_key is None and self.base_url.rstrip("/") == OPENAI_BASE_URL:
            out.append("no API key for api.openai.com: set OPENAI_API_KEY or pass --api-key")
        # NaN compares false with everything: each check is written so that NaN fails it.
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not (number(value) and 0 < value < math.inf):
                out.append(f"--{name} must be a positive number, not {value!r}")
        for flag, value in (("--max-in-flight", self.max_in_flight), ("--max-attempts", self.max_attempts)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                out.append(f"{flag} must be at least 1, not {value!r}")
        if self.max_cost is not None and not (number(self.max_cost) and 0 <= self.max_cost < math.inf):
            out.append(f"--max-cost must be a finite number of USD, 0 or more, not {self.max_cost!r}")
        for flag, value in (("--timeout", self.timeout_s), ("--deadline", self.deadline_s)):
            if not (number(value) and 0 < value < math.inf):
                out.append(f"{flag} must be a positive number of seconds, not {value!r}")
        return out
