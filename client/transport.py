"""One shared aiohttp connection pool to an OpenAI-compatible server, and nothing else.

No retries here (the runner is the one retry layer) and no interpretation of bodies beyond what a
failure needs: an attempt either returns an HttpReply (any status) or raises TransportError.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Mapping

import aiohttp

from client.config import ClientConfig
from client.request import PATHS


@dataclass
class HttpReply:
    """What came back from one attempt."""

    status: int
    """HTTP status."""
    headers: Mapping[str, str]
    """Response headers (case-insensitive mapping)."""
    body: bytes
    """The whole body."""


class TransportError(Exception):
    """An attempt that got no complete HTTP reply: type is 'timeout' or 'connection'; `reached`
    tells a connection that was made and then dropped (a reset) from one that never was."""

    def __init__(self, type: str, message: str, reached: bool = True):
        super().__init__(message)
        self.type = type
        self.message = message
        self.reached = reached


class SetupError(Exception):
    """The server cannot be used at all (nothing answers, wrong key, not the OpenAI API)."""


class Transport:
    """Posts request bodies to {base_url}/chat/completions or /completions over one pool."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **config.extra_headers}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # One pool, sized to our own cap (the runner never has more in flight), kept alive between
        # requests: a new connection per request is what made earlier clients slow.
        connector = aiohttp.TCPConnector(limit=self.config.max_in_flight + 4, ttl_dns_cache=300,
                                         keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers=self._headers,
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, kind: str, payload: bytes) -> HttpReply:
        """Send one attempt; returns any HTTP reply, raises TransportError for no (complete) reply."""
        try:
            async with self._session.post(self.base_url + PATHS[kind], data=payload) as resp:
                body = await resp.read()
                return HttpReply(resp.status, resp.headers, body)
        except asyncio.TimeoutError:
            raise TransportError("timeout", f"no complete reply within {self.config.timeout_s:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise TransportError("connection", f"cannot connect to {self.base_url}: {exc.os_error or exc}",
                                 reached=False) from None
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            # Resets, a server that closes mid-reply, a body shorter than its Content-Length.
            raise TransportError("connection", " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(": ")) from None

    async def answers(self, timeout_s: float) -> bool:
        """Whether the server gives any HTTP reply at all to GET {base_url}/models (any status). A
        request that fails without a reply tells apart a server that is down from one that is up
        but drops this particular request."""
        try:
            async with self._session.get(self.base_url + "/models",
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                await resp.read()
                return True
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def check(self, timeout_s: float = 10.0) -> list[str]:
        """GET {base_url}/models: fail fast, with a fix, when the server cannot be used. Returns the
        model ids it lists. 429 and 5xx count as alive (the run's own retries handle them)."""
        url = self.base_url + "/models"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                body = await resp.read()
                status, ctype = resp.status, resp.headers.get("Content-Type", "")
        except asyncio.TimeoutError:
            raise SetupError(f"no answer from {url} within {timeout_s:g} s: is the server up and --base-url "
                             "right?") from None
        except aiohttp.ClientConnectorError as exc:
            raise SetupError(f"nothing answers at {self.base_url} ({exc.os_error or exc}): start the server or fix "
                             "--base-url / OPENAI_BASE_URL") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SetupError(f"the connection to {self.base_url} failed ({type(exc).__name__}: {exc}): is it an "
                             "HTTP server? fix --base-url / OPENAI_BASE_URL") from None
        if status in (401, 403):
            hint = "the key was refused" if self.config.api_key else "no API key was sent"
            raise SetupError(f"{url} answered {status} ({server_message(body)}): {hint}; set OPENAI_API_KEY "
                             "or pass --api-key")
        if status == 404:
            raise SetupError(f"{url} answered 404: not an OpenAI-compatible API there; the base URL usually "
                             "ends in /v1")
        if status == 429 or status >= 500:
            return []
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        if status >= 400 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
            snippet = body[:80].decode("utf-8", "replace").replace("\n", " ")
            raise SetupError(f"{self.base_url} does not speak the OpenAI API (GET /models answered {status} "
                             f"{ctype or 'without a content type'}: {snippet!r}); check --base-url")
        return [m["id"] for m in data["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]


def server_message(body: bytes, limit: int = 300) -> str:
    """The server's error message from an OpenAI error body ({"error": {"message": ...}}), or the
    start of the body; one line."""
    text = ""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or "")
        elif isinstance(err, str):
            text = err
        if not text and isinstance(data.get("detail"), str):
            text = data["detail"]
    if not text:
        text = body[:limit].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "") if text else "(empty body)"
