"""The client's subcommands of `neuronatlas`: batch, dead-letters, retry-dead.

register() only builds parsers (cheap: `neuronatlas record` should not import aiohttp); each handler
imports what it needs. `python -m client.cli ...` runs the same commands without the engine.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server and limits")
    g.add_argument("--base-url", default=None, help="API root of any OpenAI-compatible server "
                   "(default: $OPENAI_BASE_URL or https://api.openai.com/v1)")
    g.add_argument("--api-key", default=None,
                   help="API key (default: $OPENAI_API_KEY; the variable keeps it out of `ps`)")
    g.add_argument("--rpm", type=float, default=None,
                   help="requests per minute allowed (default: learned from x-ratelimit-* headers)")
    g.add_argument("--tpm", type=float, default=None,
                   help="tokens per minute allowed (default: learned from x-ratelimit-* headers)")
    g.add_argument("--max-in-flight", type=int, default=512,
                   help="most requests in flight at once (default 512; at least RPM/60 x latency in s is needed)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per attempt before it is retried (default 120)")
    g.add_argument("--deadline", type=float, default=900.0,
                   help="seconds per request, from its first attempt, after which it is dead-lettered (default 900)")
    g.add_argument("--max-attempts", type=int, default=10, help="attempts per request, 429s not counted (default 10)")
    g.add_argument("--prices", default=None,
                   help='JSON file of USD per 1M tokens, {"model": {"input": x, "output": y}} '
                   '(default: $NEURONATLAS_PRICES)')
    g.add_argument("--no-check", action="store_true", help="skip the GET /models check of the server before sending")
    g.add_argument("--no-fsync", action="store_true",
                   help="commit the store without fsync (survives crashes of this process, not power loss)")
    g.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "off"],
                   help="progress display (auto: a bar on a terminal, a line every 10 s otherwise)")


def register(sub) -> None:
    """Add the client's subcommands to `neuronatlas`'s subparsers."""
    p = sub.add_parser(
        "batch", help="send a JSONL file of OpenAI requests under rate limits; resumable",
        description="Send every request of REQUESTS.jsonl (one OpenAI request body a line, optional \"id\"; or "
        "OpenAI Batch API lines) to an OpenAI-compatible server under rate limits, with retries, and write one "
        "result line per request to --out. Every reply is stored durably first: run the same command again after "
        "a crash or Ctrl-C and only what is missing is sent.")
    p.add_argument("requests", metavar="REQUESTS.jsonl", help="request file")
    p.add_argument("--out", required=True, help="result file (JSONL, rewritten whole on every run)")
    p.add_argument("--model", default=None, help="model for lines that do not name one")
    p.add_argument("--store", default=None,
                   help="request store (SQLite) (default: $NEURONATLAS_STORE or OUT.requests.sqlite)")
    p.add_argument("--retry-dead", action="store_true",
                   help="send requests again that an earlier run dead-lettered (default: report their error)")
    p.add_argument("--max-cost", type=float, default=None, metavar="USD",
                   help="stop sending before this run's spending (by --prices) could pass this many USD")
    _add_client_flags(p)
    p.set_defaults(func=batch_command)

    p = sub.add_parser("dead-letters", help="list the requests of a store that failed for good",
                       description="List the dead-lettered requests of a request store, grouped by error.")
    p.add_argument("--store", default=None, help="request store (default: $NEURONATLAS_STORE)")
    p.add_argument("--json", action="store_true", help="one JSON object per dead letter (key, kind, body, error)")
    p.add_argument("--limit", type=int, default=20, help="entries listed after the summary (default 20)")
    p.set_defaults(func=dead_letters_command)

    p = sub.add_parser("retry-dead", help="send the dead-lettered requests of a store again",
                       description="Send every dead-lettered request of a store again; those that succeed move to "
                       "the results (rerun `batch` to rewrite its result file).")
    p.add_argument("--store", default=None, help="request store (default: $NEURONATLAS_STORE)")
    _add_client_flags(p)
    p.set_defaults(func=retry_dead_command)
    __import__("client.explain_cli", fromlist=["register_explain"]).register_explain(sub)  # explain, simulate, score, top


# -- helpers --------------------------------------------------------------------------------------

def _user_error(message: str) -> Exception:
    from engine.cli import UserError
    return UserError(message)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def client_config(args, store_path: str, retry_dead: bool, check: bool = True):
    """The ClientConfig of a command's client flags (shared by batch, explain and simulate);
    with check=False (a dry run) problems such as a missing key are not errors."""
    from client.config import ClientConfig
    from client.prices import PriceTable
    try:
        prices = PriceTable.load(args.prices)
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    config = ClientConfig.from_env(
        base_url=args.base_url, api_key=args.api_key, rpm=args.rpm, tpm=args.tpm, max_in_flight=args.max_in_flight,
        timeout_s=args.timeout, deadline_s=args.deadline, max_attempts=args.max_attempts, store_path=store_path,
        durable=not args.no_fsync, retry_dead_letters=retry_dead, prices=prices,
        max_cost=getattr(args, "max_cost", None))
    problems = config.problems()
    if problems and check:
        raise _user_error(problems[0])
    return config


def _store_path(args, fallback: str | None) -> str:
    path = args.store or os.environ.get("NEURONATLAS_STORE") or fallback
    if not path:
        raise _user_error("no request store given: pass --store or set NEURONATLAS_STORE")
    return path


async def _run(config, requests, args, label: str, models: set[str]):
    """Send `requests` with a progress display and Ctrl-C handling.
    Returns (client, elapsed seconds, abort reason or None, whether the user interrupted)."""
    import asyncio
    import signal
    import threading

    from client.progress import Progress
    from client.runner import Client, RunAborted
    from client.store import StoreError
    from client.transport import SetupError

    client = Client(config)
    try:
        await client.open()
    except (SetupError, StoreError) as exc:
        await client.transport.close()
        raise _user_error(str(exc)) from None
    aborted, interrupted = None, False
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    progress = None
    checking = None  # the server check while it runs: a Ctrl-C then stops before anything is sent

    def on_signal() -> None:
        if checking is not None and not checking.done():
            client.stop()
            checking.cancel()
        elif not client.stopped:
            client.stop()
            note = (f"{label}: interrupted: finishing {client.in_flight} requests in flight "
                    "(press Ctrl-C again to cancel them)")
            progress.write(note) if progress is not None else _say(note)
        else:
            client.stop(cancel_in_flight=True)
            note = f"{label}: cancelling the requests in flight"
            progress.write(note) if progress is not None else _say(note)

    # SIGTERM as Ctrl-C, from the start (the server check included)
    signals = [signal.SIGINT, signal.SIGTERM] if threading.current_thread() is threading.main_thread() else []
    before = {sig: signal.getsignal(sig) for sig in signals}  # asyncio's removal would leave SIG_DFL
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        if requests and not args.no_check:
            checking = asyncio.ensure_future(client.check())
            try:
                listed = await checking
            except asyncio.CancelledError:
                if not client.stopped:  # not our Ctrl-C: the caller's cancel
                    raise
                listed = None
            except SetupError as exc:
                raise _user_error(str(exc)) from None
            missing = sorted(m for m in models if listed and m not in listed)
            if missing:
                _say(f"{label}: warning: the server does not list {', '.join(map(repr, missing))} (it lists "
                     f"{', '.join(listed[:5])}{', ...' if len(listed) > 5 else ''}); those requests may fail with 404")
        if not client.stopped:
            progress = Progress(client, len(requests), mode=args.progress, label=label)
            progress.start()
            start = time.monotonic()
            try:
                async for _ in client.stream(requests):
                    pass
            except RunAborted as exc:
                aborted = str(exc)
            except StoreError as exc:  # the store damaged while reading it
                raise _user_error(str(exc)) from None
        else:
            _say(f"{label}: interrupted before anything was sent")
        interrupted = client.stopped and aborted is None
    finally:
        if progress is not None:
            progress.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
            if before[sig] is not None:
                signal.signal(sig, before[sig])
        await client.aclose()
    return client, time.monotonic() - start, aborted, interrupted


# -- batch ----------------------------------------------------------------------------------------

def batch_command(args) -> int:
    import asyncio

    from client.batch import read_requests, write_results
    from client.progress import summary
    from client.store import RequestStore, StoreError

    store_path = _store_path(args, args.out + ".requests.sqlite")
    config = client_config(args, store_path, args.retry_dead)
    if os.path.isdir(args.requests):
        raise _user_error(f"{args.requests} is a directory: pass a JSONL file of requests")
    _check_out(args.out, args.requests, store_path)
    try:
        lines = read_requests(args.requests, default_model=args.model)
    except FileNotFoundError:
        raise _user_error(f"request file {args.requests} not found") from None
    except OSError as exc:
        raise _user_error(f"cannot read {args.requests}: {exc.strerror}") from None
    if not lines:
        raise _user_error(f"{args.requests} has no requests (one JSON request body a line)")
    bad = [line for line in lines if line.error]
    if not args.model and bad and all("no \"model\"" in line.error for line in lines if line.error) and \
            len(bad) == len(lines):
        raise _user_error('no line names a model: pass --model or add "model" to each request')
    for line in bad[:10]:
        _say(f"batch: {args.requests}: {line.error}")
    if len(bad) > 10:
        _say(f"batch: ... and {len(bad) - 10} more bad lines (all listed in {args.out})")
    requests = [line.request for line in lines if line.request is not None]
    models = {r.body.get("model") for r in requests if isinstance(r.body.get("model"), str)}

    client, elapsed, aborted, interrupted = asyncio.run(_run(config, requests, args, "batch", models))
    _say(summary(client, elapsed, "batch"))
    if aborted:
        raise _user_error(aborted)
    if interrupted:
        _say(f"batch: interrupted: {client.stats.ok:,} of {len(requests):,} requests are done and stored in "
             f"{store_path}. Run the same command again to resume; completed requests will not be sent again.")
        return 130
    try:
        store = RequestStore(store_path)
    except StoreError as exc:
        raise _user_error(str(exc)) from None
    try:
        keys = [r.key for r in requests]
        responses = store.responses(keys)
        errors = {d.key: {"type": d.error_type, **({"status": d.status} if d.status is not None else {}),
                          "message": d.message} for d in store.dead_letters(keys)}
    finally:
        store.close()
    try:
        write_results(args.out, lines, responses, errors)
    except OSError as exc:
        raise _user_error(f"cannot write {args.out} ({exc.strerror or exc}); the replies are kept in {store_path}: "
                          "run the same command with another --out to write them (nothing is sent again)") from None
    ok = sum(1 for line in lines if line.request is not None and line.request.key in responses)
    failed = len(lines) - ok
    _say(f"batch: wrote {len(lines):,} result lines to {args.out} ({ok:,} replies, {failed:,} errors); store: "
         f"{store_path}" + (f"; list failures with `neuronatlas dead-letters --store {store_path}`" if errors else ""))
    return 0 if failed == 0 else 1


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _check_out(out: str, requests: str, store: str | None = None) -> None:
    """Before anything is sent: the result file can be written and is neither the request file
    nor the request store (writing the results over the store would lose every stored reply)."""
    if os.path.isdir(out):
        raise _user_error(f"--out {out} is a directory: give the path of the result file")
    if _same_file(out, requests):
        raise _user_error(f"--out {out} is the request file: the results would overwrite the requests; "
                          "give another path")
    if store is not None and _same_file(out, store):
        raise _user_error(f"--out {out} is the request store (--store): the results would overwrite the stored "
                          "replies; give another path")
    parent = os.path.dirname(os.path.abspath(out))
    above = parent
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise _user_error(f"cannot write --out {out}: {above} is a file, not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".neuronatlas-check-"):
            pass
    except OSError as exc:
        raise _user_error(f"cannot write --out {out} ({exc.strerror or exc}): give a path in a writable "
                          "directory") from None


# -- dead letters ---------------------------------------------------------------------------------

def _open_store(args):
    from client.store import RequestStore, StoreError
    path = _store_path(args, None)
    if not os.path.exists(path):
        raise _user_error(f"request store {path} not found: pass the --store a batch run used")
    try:
        return RequestStore(path)
    except StoreError as exc:
        raise _user_error(str(exc)) from None


def _read_dead_letters(args) -> tuple[str, list]:
    """(the request store's path, its dead letters), the store closed again."""
    store = _open_store(args)
    try:
        return store.path, list(store.dead_letters())
    finally:
        store.close()


def _why(d) -> str:
    return f"{d.error_type}{' ' + str(d.status) if d.status else ''}"


def dead_letters_command(args) -> int:
    import json
    from collections import Counter

    if args.limit < 0:
        raise _user_error(f"--limit must be 0 or more, not {args.limit}")
    path, dead = _read_dead_letters(args)
    if args.json:
        for d in dead:
            print(json.dumps({"key": d.key, "kind": d.kind, "body": d.body, "error": {
                "type": d.error_type, "status": d.status, "message": d.message},
                "attempts": d.attempts, "runs": d.runs, "failed_at": d.failed_at}, ensure_ascii=False))
        return 0
    if not dead:
        print(f"{path}: no dead letters")
        return 0
    # "gave up after 7 attempts in 41 s (max attempts): X" and "... 9 attempts in 44 s ...": one group.
    groups = Counter(f"{_why(d)}: {_GAVE_UP.sub(_GAVE_UP_GROUP, d.message)[:120]}" for d in dead)
    print(f"{path}: {len(dead):,} dead letters")
    for text, n in groups.most_common():
        print(f"  {n:>6,} x {text}")
    print(f"oldest {min(args.limit, len(dead))}:")
    for d in dead[: args.limit]:
        model = d.body.get("model", "?")
        print(f"  {d.key[:12]}  {d.kind:<10} {model:<20} attempts {d.attempts:<3} runs {d.runs:<2} "
              f"{_why(d)}: {d.message[:100]}")
    print(f"retry them with `neuronatlas retry-dead --store {path}`")
    return 0


_GAVE_UP = re.compile(r"^gave up after \d+ attempts in \d+ s \(([^)]*)\): ")
_GAVE_UP_GROUP = r"gave up (\1): "


def retry_dead_command(args) -> int:
    import asyncio

    from client.progress import summary
    from client.request import Request

    path, dead = _read_dead_letters(args)
    if not dead:
        _say(f"retry-dead: {path} has no dead letters")
        return 0
    config = client_config(args, path, retry_dead=True)
    requests = [Request(d.body, d.kind, d.key[:12]) for d in dead]
    models = {r.body.get("model") for r in requests if isinstance(r.body.get("model"), str)}
    client, elapsed, aborted, interrupted = asyncio.run(_run(config, requests, args, "retry-dead", models))
    _say(summary(client, elapsed, "retry-dead"))
    if aborted:
        raise _user_error(aborted)
    if interrupted:
        _say("retry-dead: interrupted; run it again to retry the rest")
        return 130
    _say(f"retry-dead: {client.stats.ok:,} of {len(dead):,} now completed (rerun `batch` to rewrite its result "
         f"file); {client.stats.failed:,} still dead-lettered")
    return 0 if client.stats.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m client.cli COMMAND ...`: the client's commands without the engine."""
    parser = argparse.ArgumentParser(prog="python -m client.cli")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    from engine.cli import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
