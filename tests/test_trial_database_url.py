"""A PostgreSQL URL that libpq cannot read, as an operator mistypes one on day one (a space
in the password, a stray '%'): check-config must say so, and no message may quote the
password (libpq's own parse errors quote the part they choke on, or the whole URL)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from matrixjobs.config import database_url_problem, load_config
from matrixjobs.errors import ConfigError

UNREADABLE = [
    "postgresql://bob:hunter2 hunter2@127.0.0.1:5432/jobs",  # "unexpected spaces found in …"
    "postgresql://bob:hunter2%zzhunter2@127.0.0.1:5432/jobs",  # "invalid percent-encoded …"
    "postgresql://bob:hunter2hunter2@127.0.0.1:5432/jobs?sslmode",  # a query without '='
]


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[store]\nbackend = "postgresql"\n[targets.hello]\ncommand = ["true"]\n',
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("url", UNREADABLE)
def test_an_unreadable_database_url_is_a_config_error_that_never_quotes_it(tmp_path, url):
    with pytest.raises(ConfigError,
                       match="MATRIXJOBS_DATABASE_URL: libpq cannot read it") as raised:
        load_config(config_file(tmp_path), environ={"MATRIXJOBS_DATABASE_URL": url})
    assert "hunter2" not in str(raised.value)
    problem = database_url_problem(url)  # migrate-store --to
    assert problem is not None and "hunter2" not in problem


def test_check_config_and_run_refuse_it_without_the_password(tmp_path):
    path = config_file(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "MATRIXJOBS_DATABASE_URL": UNREADABLE[0]}
    for command in ("check-config", "run"):
        done = subprocess.run([sys.executable, "-m", "matrixjobs", command, "--config", str(path)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode != 0, command
        assert "libpq cannot read it" in done.stderr, command
        assert "hunter2" not in done.stdout + done.stderr, command
