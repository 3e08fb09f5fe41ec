"""The `neuronatlas` command.

Each package registers its own subcommands: the engine owns recording and reading stores, the
client (`client.cli.register`) owns everything that talks to an LLM server. Errors that a user can
fix are raised as `UserError` and printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys


from engine.errors import UserError  # noqa: F401  (re-exported for the client's commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronatlas",
        description="Record every MLP neuron of a language model, then explain and score them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from engine import commands as engine_commands

    engine_commands.register(sub)
    from client import cli as client_cli

    client_cli.register(sub)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run_command(args) -> int:
    """Run a parsed command: a UserError is one line and exit 2, Ctrl-C exit 130. SIGTERM is Ctrl-C
    wherever a command has not made its own arrangements (recording and sending requests have), so
    that a command stopped by `kill` or a job scheduler says so and cleans up as for Ctrl-C, rather
    than vanishing without a word."""
    import signal
    import threading

    old = None
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
        old = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run(args) -> int:
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"neuronatlas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neuronatlas {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`neuronatlas dead-letters ... | head`): stop quietly, as a program
        # killed by SIGPIPE would, and keep Python's exit-time flush from printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # while the commands' modules load
        print("neuronatlas: interrupted", file=sys.stderr)
        return 130
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
