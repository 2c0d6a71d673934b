"""`matrixjobs doctor`: check everything a deployment needs, one line per check.

✓ fine, ! worth knowing (the service still works), ✗ broken. Safe to run next to the
running service: it reads the store read-only and never takes the service's lock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import httpx2
from pydantic import SecretStr

from matrixjobs.api.server import bind_tcp, bind_unix
from matrixjobs.config import (
    Config,
    MatrixConfig,
    TargetProblem,
    TcpAddress,
    UnixAddress,
    WarningTopic,
    load_config,
)
from matrixjobs.errors import ConfigError
from matrixjobs.fleet import worker_state
from matrixjobs.models import Worker
from matrixjobs.ops.matrix_checks import MatrixChecks
from matrixjobs.ops.report import Report
from matrixjobs.ops.store_probe import SCHEMA_VERSION, StoreProblem, StoreState, probe
from matrixjobs.private import shared
from matrixjobs.progress import wording
from matrixjobs.queue.containment import describe, pick_runner, shared_state, unenforceable
from matrixjobs.queue.handlers import HandlerRegistry, load_user_handlers
from matrixjobs.store import describe_store

# Config warnings the checks below repeat in detail (targets) or decide better (login:
# the token the service saved in its store also works).
CHECKED_IN_DETAIL = frozenset({WarningTopic.TARGET, WarningTopic.CREDENTIALS})
HEALTHZ_TIMEOUT_S = 3.0


def doctor(config_path: Path, environ: Mapping[str, str] | None = None,
           out: TextIO | None = None) -> Report:
    env = os.environ if environ is None else environ
    report = Report(out)
    config = check_config(report, config_path, env)
    if config is None:
        return report
    if config.store.backend == "sqlite":
        store = check_store(report, config.store.path)
    else:
        store = None
        check_postgres(report, config)
    if config.matrix is not None:
        check_pickle_key(report, config.matrix, config.store.path)
    check_private_files(report, config)
    check_targets(report, config)
    check_containment(report, config)
    check_api(report, config)
    if config.matrix is None:
        report.ok("matrix", "off (no [matrix] section): jobs run without the bot")
    else:
        MatrixChecks(config.matrix, config.access, store, report, env).run()
    return report


def check_config(report: Report, path: Path, environ: Mapping[str, str]) -> Config | None:
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        report.fail("config", str(exc))
        return None
    report.ok("config", f"{path} is valid")
    for warning in config.warning_items():
        if warning.topic not in CHECKED_IN_DETAIL:
            report.warn("config", str(warning))
    return config


def check_store(report: Report, path: Path) -> StoreState | None:
    try:
        state = probe(path)
    except StoreProblem as exc:
        report.fail("store", str(exc))
        return None
    running = (f"; open in the running service (pid {state.holder_pid})"
               if state.holder_pid else "")
    if state.writer_pid is not None and state.writer_pid != state.holder_pid:
        report.warn("store", f"{path} is locked by another process (pid {state.writer_pid}) "
                             "in a write transaction: the service waits for it at start "
                             "([store] lock_wait_s) and cannot save anything meanwhile")
    if not state.exists:
        report.ok("store", f"{path} does not exist yet; the service creates it at start")
    elif state.schema_version == SCHEMA_VERSION:
        report.ok("store", f"{path} (schema version {state.schema_version}){running}")
    elif state.schema_version == 0:
        report.warn("store", f"{path} has no matrixjobs tables yet; the service creates them "
                             "at start")
    else:
        report.ok("store", f"{path} (schema version {state.schema_version}; the service "
                           f"migrates it to {SCHEMA_VERSION} at start){running}")
    return state


def check_postgres(report: Report, config: Config) -> None:
    from matrixjobs.ops.pg_probe import PG_SCHEMA_VERSION, probe_postgres  # loads psycopg

    url = config.store.database_url
    if url is None:  # load_config refuses this
        report.fail("store", describe_store(config.store))
        return
    try:
        state = probe_postgres(url.get_secret_value())
    except StoreProblem as exc:
        report.fail("store", str(exc))
        return
    where = f"PostgreSQL at {state.where}"
    if state.schema_version > PG_SCHEMA_VERSION:
        report.fail("store", f"{where}: schema version {state.schema_version} is newer than "
                             f"this matrixjobs understands ({PG_SCHEMA_VERSION}); upgrade it")
    elif not state.can_write:
        report.fail("store", f"{where}: the role may not "
                             f"{'write the tables' if state.schema_version else 'create tables'}"
                             "; GRANT it that")
    elif state.schema_version == 0:
        report.ok("store", f"{where} answers and has no matrixjobs tables yet; the service "
                           "creates them at start")
    else:
        migrates = ("" if state.schema_version == PG_SCHEMA_VERSION else
                    f"; the service migrates it to {PG_SCHEMA_VERSION} at start")
        report.ok("store", f"{where} (schema version {state.schema_version}{migrates})")
    check_workers(report, config, state.workers, time.time())


def check_workers(report: Report, config: Config, workers: list[Worker], now: float) -> None:
    """Who runs jobs from the database, who went silent, and targets nobody live can run."""
    states = [worker_state(worker, now, config.queue.lease_s) for worker in workers]
    live = [worker for worker, state in zip(workers, states, strict=True) if state.alive]
    for state in states:
        labels = f"labels {', '.join(state.labels)}" if state.labels else "no labels"
        about = f"{state.role} on {state.host} (pid {state.pid}), {labels}"
        if state.alive:
            report.ok(f"worker {state.name}", f"{about}, {wording.load(state)}")
        else:
            report.warn(f"worker {state.name}", f"{about}: {wording.liveness(state)}; its jobs "
                                                "go to others as their leases expire")
    if not live and config.queue.workers:
        report.ok("workers", "none live; this node runs jobs once started")
    elif not live:
        report.warn("workers", "none live, and this node runs none ([queue] workers = 0): "
                               "jobs wait until a `matrixjobs worker` starts")
    for name, target in sorted(config.targets.items()):
        if target.runs_on and not any(worker.takes(target.runs_on) for worker in live):
            report.warn(f"targets.{name}", f"no live worker has {', '.join(target.runs_on)}; "
                                           "its jobs will wait")



def check_pickle_key(report: Report, matrix: MatrixConfig, db: Path) -> None:
    """Where the crypto store's pickle key comes from (matrix/crypto_store.py)."""
    key_file = matrix.pickle_key_file(db)
    if matrix.pickle_key is None:
        made = "" if _exists(key_file) else " (the bot creates it at its first start)"
        report.ok("pickle key", f"{key_file}{made}; back it up with the crypto store")
    elif _exists(key_file):
        report.warn("pickle key", f"MATRIXJOBS_PICKLE_KEY is set and {key_file} is not used: "
                                  "a crypto store made with the file's key does not open "
                                  "with another (docs/encryption.md, The pickle key)")
    else:
        report.ok("pickle key", "MATRIXJOBS_PICKLE_KEY; back it up with the crypto store")


def check_private_files(report: Report, config: Config) -> None:
    """The store holds the bot's access token, the crypto store its keys: the service
    makes them private, but a copy or an older version may have left them readable."""
    db = config.store.path
    paths = [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", ".lock"))]
    if config.matrix is not None:
        crypto_dir = config.matrix.crypto_store_dir(db)
        paths += [config.matrix.pickle_key_file(db), crypto_dir]
        with contextlib.suppress(OSError):  # missing, or not ours to look into
            paths += sorted(crypto_dir.iterdir())
    exposed = shared(paths)
    if exposed:
        listed = ", ".join(f"{path} ({mode:o})" for path, mode in exposed)
        report.warn("file modes", f"readable by group or others: {listed}; they hold the "
                                  "bot's token or keys. The service makes them private at its "
                                  "next start (or: chmod go= on each)")
    elif any(_exists(path) for path in paths):
        report.ok("file modes", "the store and crypto store are private (0600, dirs 0700)")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # under a directory we may not search: the store check says so
        return False


# -- targets ------------------------------------------------------------------------------------


def check_targets(report: Report, config: Config) -> None:
    try:
        load_user_handlers(config, HandlerRegistry())
        handlers_load = True
    except ConfigError as exc:
        report.fail("handlers", str(exc))
        handlers_load = False
    for name, target in sorted(config.targets.items()):
        if target.handler is not None:
            if handlers_load:
                report.ok(f"target {name}", f"handler '{target.handler}'")
            continue
        try:
            runs = target.resolve_executable()
        except TargetProblem as exc:
            report.fail(f"target {name}", str(exc))
        else:
            report.ok(f"target {name}", f"runs {runs} in {target.cwd}")
    if not config.targets:
        report.warn("targets", "none configured: nobody can run anything")


# -- api ----------------------------------------------------------------------------------------


def check_containment(report: Report, config: Config) -> None:
    """What contains jobs on this host (as this user), what enforces each limit, and the
    limits that nothing here can keep (the service refuses to start with those)."""
    if config.queue.workers == 0:
        report.ok("containment", "this node runs no jobs ([queue] workers = 0)")
        return
    try:
        runner = pick_runner(config, enable_cgroups=False)
    except ConfigError as exc:
        report.fail("containment", str(exc))
        return
    enforcement = runner.enforcement
    if enforcement.warnings:
        report.warn("containment", f"{enforcement.mechanism}: {' '.join(enforcement.warnings)}")
    else:
        report.ok("containment", enforcement.mechanism)
    for key, how in describe(runner):
        report.ok(key, how)
    for problem in unenforceable(config, runner):
        report.fail("limits", f"{problem}: the service will not start")
    for line in shared_state(config, runner):
        report.warn("containment", line)


def check_api(report: Report, config: Config) -> None:
    if not config.api.enabled:
        report.ok("api", "off ([api] enabled = false)")
        return
    address = config.api.address
    if isinstance(address, UnixAddress):
        check_api_socket(report, address, config.api_token)
        return
    if address.port == 0:
        report.ok("api", f"{address}: the service picks a free port at start")
        return
    if healthz(report, address, f"http://{address}", None, config.api_token):
        return
    try:
        bind_tcp(address).close()
    except OSError as exc:
        report.fail("api", f"cannot listen on {address}: {exc.strerror or exc}")
        return
    report.ok("api", f"{address} is free; the service listens there")


def check_api_socket(report: Report, address: UnixAddress, token: SecretStr | None) -> None:
    path = address.path
    try:
        is_socket, exists = path.is_socket(), path.exists() or path.is_symlink()
    except OSError as exc:
        report.fail("api", f"cannot look into {path.parent}: {exc.strerror or exc}")
        return
    if is_socket:
        if not healthz(report, address, "http://localhost", path, token):
            report.ok("api", f"{path} is left from an earlier run (nobody answers); the "
                             "service replaces it at start")
        return
    if exists:
        report.fail("api", f"{path} exists and is not a socket")
        return
    # Bind as the service will: that also catches a path too long for a socket address.
    try:
        bind_unix(address).close()
    except OSError as exc:
        report.fail("api", f"cannot listen on {address}: {exc.strerror or exc}")
        return
    path.unlink()
    report.ok("api", f"{address}: the service creates the socket at start")


def healthz(report: Report, address: TcpAddress | UnixAddress, base: str, socket: Path | None,
            token: SecretStr | None) -> bool:
    """Report what answers GET /healthz at the address; False if nothing listens there."""
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    transport = httpx2.HTTPTransport(uds=str(socket)) if socket is not None else None
    try:
        with httpx2.Client(transport=transport, timeout=HEALTHZ_TIMEOUT_S) as http:
            response = http.get(f"{base}/healthz", headers=headers)
    except httpx2.ConnectError:
        return False
    except httpx2.HTTPError as exc:
        report.fail("api", f"{address} is taken by something that does not answer HTTP "
                           f"({type(exc).__name__})")
        return True
    try:
        answer = response.json()
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
        answer = None
    if response.status_code == 200 and isinstance(answer, dict) and answer.get("status") == "ok":
        report.ok("api", f"the running matrixjobs service (version {answer.get('version')}) "
                         f"answers at {address}")
    elif response.status_code == 401:
        which = "the configured token" if token else "requests without a token"
        report.warn("api", f"a service at {address} refuses {which}: it runs with another "
                           "MATRIXJOBS_API_TOKEN")
    else:
        report.fail("api", f"{address} is taken by another program (GET /healthz: HTTP "
                           f"{response.status_code})")
    return True
