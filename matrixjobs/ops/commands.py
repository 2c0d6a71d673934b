"""The `init`, `doctor`, `migrate-store` and `backup` subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from matrixjobs.config import load_config
from matrixjobs.errors import ConfigError
from matrixjobs.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from matrixjobs.ops import backup, init, migrate
from matrixjobs.ops.doctor import doctor
from matrixjobs.ops.store_probe import StoreProblem


def add_ops_commands(commands: Any) -> None:
    """Register `init`, `doctor`, `migrate-store` and `backup` on the CLI's subparsers."""
    default_config = os.environ.get("MATRIXJOBS_CONFIG", "config.toml")

    parser = commands.add_parser(
        "init", help="write a starter config.toml and .env (asks for what flags leave out)",
        description="Write a starter config (no secrets) and a .env with the bot's password "
                    "or access token and a random key for its crypto store (mode 0600); "
                    "--force keeps the key of the .env it replaces. On a terminal, values "
                    "not given as flags are asked for; with --yes or without a terminal "
                    "they are required.")
    parser.add_argument("--config", type=Path, default=Path(default_config),
                        help=f"config file to write (default: {default_config})")
    parser.add_argument("--env-file", type=Path,
                        help="secrets file to write (default: .env beside the config)")
    parser.add_argument("--homeserver", help="homeserver URL, like https://matrix.example.org")
    parser.add_argument("--user-id", help="the bot's account, like @jobs:example.org")
    parser.add_argument("--room", action="append", default=[], metavar="ROOM",
                        help="room id or alias to join at start (repeatable)")
    parser.add_argument("--allowed-user", action="append", default=[], metavar="USER",
                        help="user id or glob allowed to run jobs (repeatable; at least one)")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--password", nargs="?", const=init.ASK, metavar="PASSWORD",
                        help="log in with a password; without a value it is asked for or "
                             "taken from $MATRIXJOBS_PASSWORD (a value here lands in your "
                             "shell history)")
    secret.add_argument("--access-token", nargs="?", const=init.ASK, metavar="TOKEN",
                        help="log in with an access token; without a value it is asked for "
                             "or taken from $MATRIXJOBS_ACCESS_TOKEN")
    parser.add_argument("--yes", "-y", action="store_true",
                        help="never ask: missing values are an error")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(handler=cmd_init)

    parser = commands.add_parser(
        "doctor", help="check config, homeserver, login, rooms, store, targets and API",
        description="Check everything a deployment needs, one line per check: ✓ fine, "
                    "! worth knowing, ✗ broken (exit 1). Safe while the service runs. "
                    "$MATRIXJOBS_ADMIN_TOKEN (a homeserver admin's token) lets it check "
                    "the bot's rate-limit exemption.")
    parser.add_argument("--config", type=Path, default=Path(default_config),
                        help="TOML config file")
    parser.set_defaults(handler=cmd_doctor)

    parser = commands.add_parser(
        "migrate-store", help="copy the SQLite store into an empty PostgreSQL database",
        description="Copy jobs, batches, logs, the bot's progress messages, processed events "
                    "and settings from the configured SQLite store into an empty PostgreSQL "
                    "database, in one transaction, keeping every id. Stop the service "
                    "first. The config file is not changed: the output says what to set.")
    parser.add_argument("--config", type=Path, default=Path(default_config),
                        help="TOML config file (names the SQLite store)")
    parser.add_argument("--to", metavar="URL",
                        help="postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE (default: "
                             "$MATRIXJOBS_DATABASE_URL, else [store] url); a password here "
                             "is allowed and never printed, but lands in your shell history")
    parser.set_defaults(handler=cmd_migrate_store)

    parser = commands.add_parser(
        "backup", help="copy the live SQLite store to a file, consistent and checked",
        description="Copy the SQLite store with SQLite's online backup API while the service "
                    "runs (no stop needed), write the copy readable by you only (0600), run "
                    "SQLite's integrity check on it and say what it holds. The copy holds "
                    "the bot's access token: keep it as private as the env file. For a "
                    "PostgreSQL store, print the pg_dump command instead.")
    parser.add_argument("--config", type=Path, default=Path(default_config),
                        help="TOML config file (names the store)")
    parser.add_argument("--to", type=Path, required=True, metavar="FILE",
                        help="where the copy goes (must not exist yet)")
    parser.set_defaults(handler=cmd_backup)


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor(args.config)
    return EXIT_FAILED if report.failed else EXIT_OK


def cmd_migrate_store(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        url = migrate.target_url(args.to, config)
    except migrate.MigrateRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        migration = migrate.migrate(config, url)
    except migrate.MigrateRefused as exc:
        print(f"error: {exc}; nothing was copied", file=sys.stderr)
        return EXIT_FAILED
    migrate.report(migration, config, sys.stdout)
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if config.store.backend == "postgresql":
        print("the store is in PostgreSQL; back it up with pg_dump (the password from "
              "~/.pgpass or PGPASSWORD):\n  " + backup.pg_dump_command(config, args.to))
        return EXIT_OK
    try:
        summary = backup.backup_sqlite(config.store.path, args.to)
    except StoreProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"backed up {config.store.path} to {args.to}: {backup.describe(summary)} "
          "(integrity check: ok)")
    return EXIT_OK


def cmd_init(args: argparse.Namespace, prompts: init.Prompts | None = None) -> int:
    config: Path = args.config
    env_file: Path = args.env_file or config.parent / ".env"
    request = init.Request(
        homeserver=args.homeserver, user_id=args.user_id, rooms=tuple(args.room),
        allowed_users=tuple(args.allowed_user), password=args.password,
        access_token=args.access_token)
    if prompts is None and not args.yes and sys.stdin.isatty():
        prompts = init.Prompts()
    try:
        init.refuse_existing([config, env_file], args.force)
        answers = init.collect(request, prompts, os.environ)
    except init.InitUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (init.FilesExistError, init.WriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except EOFError:
        print("\nerror: aborted, nothing written", file=sys.stderr)
        return EXIT_FAILED
    answers = replace(answers, secrets={**answers.secrets,
                                        init.PICKLE_KEY_ENV: init.pickle_key(env_file)})
    for warning in init.warnings(answers):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        init.write_files([(config, init.render_config(answers), 0o644),
                          (env_file, init.render_env(answers), 0o600)])
    except init.WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(init.next_steps(config, env_file, answers))
    return EXIT_OK
