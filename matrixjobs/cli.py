"""The `matrixjobs` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence

from matrixjobs import __version__
from matrixjobs.app import App
from matrixjobs.config import Config, load_config
from matrixjobs.console.commands import add_client_commands
from matrixjobs.daemon import serve
from matrixjobs.demo.command import add_demo_command
from matrixjobs.errors import ConfigError, MatrixJobsError
from matrixjobs.exitcodes import EXIT_FAILED, EXIT_OK
from matrixjobs.logs import mask, setup_logging
from matrixjobs.ops.commands import add_ops_commands
from matrixjobs.queue.handlers import HandlerRegistry, load_user_handlers
from matrixjobs.service import build_service, build_worker
from matrixjobs.store import describe_store

MCP_DEFAULT_API = "http://127.0.0.1:8765"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matrixjobs",
        description="Run long jobs from a Matrix room and watch them progress live.",
    )
    parser.add_argument("--version", action="version", version=f"matrixjobs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_config = os.environ.get("MATRIXJOBS_CONFIG", "config.toml")

    run = commands.add_parser("run", help="start the service (until SIGTERM/SIGINT)")
    run.add_argument("--config", default=default_config, help="TOML config file")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"],
                     help="matrixjobs' own lines; other libraries always log warnings only")
    run.set_defaults(handler=cmd_run)

    worker = commands.add_parser(
        "worker", help="run jobs only, from a PostgreSQL store shared with the service",
        description="Run jobs from the PostgreSQL store that `matrixjobs run` nodes share; no "
                    "Matrix, no API. Runs until SIGTERM/SIGINT, like `run`.")
    worker.add_argument("--config", default=default_config, help="TOML config file")
    worker.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="matrixjobs' own lines; other libraries always log warnings only")
    worker.set_defaults(handler=cmd_worker)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", default=default_config, help="TOML config file")
    check.set_defaults(handler=cmd_check_config)

    add_client_commands(commands)  # status, submit, batch, rerun, cancel, jobs: via the API
    add_ops_commands(commands)  # init, doctor, migrate-store

    mcp = commands.add_parser(
        "mcp", help="MCP server on stdio (for an MCP client to launch), via the service's API",
        description="Serve the MCP tools on stdin/stdout, talking to the running service "
                    "through its HTTP API; the token comes from $MATRIXJOBS_API_TOKEN.")
    mcp.add_argument("--api", default=os.environ.get("MATRIXJOBS_API_URL", MCP_DEFAULT_API),
                     help="the service's API URL or unix:/path/api.sock (default: "
                          f"$MATRIXJOBS_API_URL or {MCP_DEFAULT_API})")
    mcp.set_defaults(handler=cmd_mcp)
    add_demo_command(commands)
    return parser


def cmd_mcp(args: argparse.Namespace) -> int:
    """stdout carries the protocol: logs go to stderr, warnings only."""
    from matrixjobs.mcp.stdio import serve_stdio  # only load the MCP SDK for this command

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_stdio(args.api, os.environ.get("MATRIXJOBS_API_TOKEN") or None))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return EXIT_FAILED


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        load_user_handlers(config, HandlerRegistry())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for warning in config.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    print(describe(config))
    return EXIT_OK


def describe(config: Config) -> str:
    targets, webhooks, schedules = (", ".join(sorted(names)) or "none" for names in (
        config.targets, config.webhooks, config.schedules))
    matrix = config.matrix.user_id if config.matrix else "off (no [matrix] section)"
    api = "off"
    if config.api.enabled:
        token = "token required" if config.api_token is not None else "no token"
        api = f"{config.api.listen} ({token})"
    return (
        f"config OK\n  store: {describe_store(config.store)}\n  workers: {config.queue.workers}\n"
        f"  targets: {targets}\n  webhooks: {webhooks}\n  schedules: {schedules}\n"
        f"  matrix: {matrix}\n  api: {api}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    return _serve(args, build_service)


def cmd_worker(args: argparse.Namespace) -> int:
    return _serve(args, build_worker)


def _serve(args: argparse.Namespace, build: Callable[[Config], App]) -> int:
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
        mask(secret.get_secret_value() for secret in config.secrets())
        app = build(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for warning in config.warnings():
        logging.getLogger("matrixjobs").warning("%s", warning)
    try:
        asyncio.run(serve(app))
    except MatrixJobsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
