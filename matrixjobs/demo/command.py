"""The `matrixjobs demo` subcommand: its options, and the check for matrix-synapse."""

from __future__ import annotations

import argparse
import asyncio
import sys

from matrixjobs.exitcodes import EXIT_FAILED

DEFAULT_TIMEOUT_S = 120.0


def add_demo_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = commands.add_parser(
        "demo", help="try it: a throwaway homeserver, the bot and a room, shown live",
        description="Start a throwaway Synapse on loopback (in a temp dir), register the bot "
                    "and a demo user, create a room, run the bot with a few sample targets, "
                    "send !build and !batch as the demo user and show the room live as the "
                    "bot edits its progress messages. Then print how to log in with any "
                    "Matrix client, and keep running until Ctrl-C, which removes everything. "
                    "Needs the demo extra: pip install \"matrixjobs[demo]\".",
        epilog="Exit codes: 0 done (or stopped with Ctrl-C/SIGTERM); 1 the demo failed (with "
               "--until-done: a scripted command did not end as expected, or the timeout "
               "passed); 130 --until-done was interrupted.")
    demo.add_argument("--until-done", action="store_true",
                      help="exit once the scripted commands reached their final state "
                           "(0 if each ended as expected) instead of running until Ctrl-C")
    demo.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                      help="with --until-done: give up (exit 1) after this long "
                           f"(default {DEFAULT_TIMEOUT_S:.0f})")
    demo.add_argument("--keep", action="store_true",
                      help="keep the demo's directory (config, store, logs, Synapse's data)")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from matrixjobs.demo.synapse import synapse_installed

    if not synapse_installed():
        print('matrix-synapse is not installed: pip install "matrixjobs[demo]"', file=sys.stderr)
        return EXIT_FAILED
    # Loaded here: nio, the service and rich are only needed once the demo really runs.
    from matrixjobs.demo.runner import DemoError, Options, run_demo
    from matrixjobs.demo.synapse import SynapseError
    from matrixjobs.demo.view import make_display
    from matrixjobs.errors import MatrixJobsError

    options = Options(until_done=args.until_done, timeout_s=args.timeout, keep=args.keep)
    try:
        return asyncio.run(run_demo(options, make_display()))
    except (DemoError, SynapseError, MatrixJobsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
