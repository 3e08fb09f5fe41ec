"""Talking to LLM servers: transport, rate limits, retries, the durable request store.

The API that explain/simulate (and anyone) build on:

    from client import Client, ClientConfig, Request

    config = ClientConfig.from_env(rpm=30_000, tpm=150_000_000, store_path="requests.sqlite")
    async with Client(config) as client:
        result = await client.complete({"model": "gpt-4o-mini", "messages": [...], "logprobs": True,
                                        "top_logprobs": 5, "max_tokens": 1})
        logprobs = result.unwrap()["choices"][0]["logprobs"]       # raises RequestFailed on failure
        results = await client.run_many([Request(body, "chat", id=i) for i, body in enumerate(bodies)])
        async for result in client.stream(request_generator()):   # completion order, bounded memory
            ...
        client.stats   # counts, retries by cause, tokens, cost

Modules: request (Request, Result, keys), config, limits (pacing, 429 pauses, AIMD), transport
(aiohttp pool, pre-flight check), classify (what a reply means), store (SQLite WAL, dead letters),
runner (Client), prices, progress, batch + cli (`neuronatlas batch`), testserver (a loopback
OpenAI-compatible server with limits and faults). See docs/CLIENT.md.
"""

__all__ = ["Client", "ClientConfig", "Request", "Result", "RequestError", "RequestFailed", "RunAborted",
           "SetupError", "StoreError", "Usage"]

_WHERE = {"Client": "runner", "RunAborted": "runner", "ClientConfig": "config", "Request": "request",
          "Result": "request", "RequestError": "request", "RequestFailed": "request", "Usage": "request",
          "SetupError": "transport", "StoreError": "store"}


def __getattr__(name):  # keep `import client` light: aiohttp loads on first use
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"client.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
