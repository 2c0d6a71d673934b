"""The demo's matrixjobs config: a TOML file in the demo's directory, for people to read.

The service runs from exactly that text. It is validated without `load_config`'s
secrets lookup on purpose: a MATRIXJOBS_* variable or `.env` meant for someone's
real service must not leak into the throwaway one. The bot's access token is
added in memory only.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from pydantic import SecretStr

from matrixjobs.config import Config, toml_list, toml_string
from matrixjobs.demo.jobs import JOBS

HEADER = """\
# The config `matrixjobs demo` runs with (config.example.toml explains every key).
# The bot logs in with the access token it got when the demo registered it; that
# token is not written here.

[matrix]
homeserver = {homeserver}
user_id = {bot}
# The demo exempted the bot from Synapse's message rate limit (admin API
# override_ratelimit), as an operator would; rate_per_s = 0 tells the bot so.
rate_per_s = 0

[access]
allowed_users = [{user}]

[store]
path = {store}

[queue]
workers = 4
kill_grace_s = 2

[progress]
interval_ms = 500

[api]
listen = "127.0.0.1:0"          # a free port; the demo prints the one it got
"""

TARGET = """
[targets.{name}]
description = {description}
command = {command}
cwd = {cwd}
max_retries = 0
"""


def write_demo_config(directory: Path, homeserver: str, bot: str, user: str) -> Path:
    """Write `config.toml` (store and targets in `directory`) and return its path."""
    text = HEADER.format(homeserver=toml_string(homeserver), bot=toml_string(bot),
                         user=toml_string(user),
                         store=toml_string(str(directory / "matrixjobs.db")))
    for name, job in JOBS.items():
        text += TARGET.format(
            name=name, description=toml_string(job.description),
            cwd=toml_string(str(directory)),
            command=toml_list([sys.executable, "-m", "matrixjobs.demo.jobs", name]))
    path = directory / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def read_demo_config(path: Path, access_token: str) -> Config:
    config = Config.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    assert config.matrix is not None
    matrix = config.matrix.model_copy(update={"access_token": SecretStr(access_token)})
    return config.model_copy(update={"matrix": matrix})
