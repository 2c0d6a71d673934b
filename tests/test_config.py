"""load_config and the config models: the example file, every error message, secrets, paths."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from matrixjobs.config import (
    AccessConfig,
    ApiConfig,
    Config,
    LimitsConfig,
    MatrixConfig,
    ProgressConfig,
    QueueConfig,
    ScheduleConfig,
    StoreConfig,
    TargetConfig,
    TcpAddress,
    UnixAddress,
    WarningTopic,
    WorkerConfig,
    load_config,
    parse_listen,
)
from matrixjobs.errors import ConfigError
from matrixjobs.store import describe_store

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

PYTHON = json.dumps(sys.executable)  # a TOML string naming this interpreter

MATRIX = """
    [matrix]
    homeserver = "https://matrix.example.org"
    user_id = "@jobs:example.org"
"""


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No stray `.env` from the real cwd and no systemd state directory."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)


@pytest.fixture
def conf_dir(tmp_path) -> Path:
    """A directory for the config file, distinct from the process cwd."""
    directory = tmp_path / "conf"
    directory.mkdir()
    return directory


def write(directory: Path, text: str, name: str = "config.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    return str(caught.value)


def invalid(directory: Path, text: str) -> str:
    """The message a user gets for this config text."""
    return config_error(write(directory, text))


# -- the example config ------------------------------------------------------------------------


def test_example_config_loads_with_its_documented_defaults():
    config = load_config(EXAMPLE, environ={})
    assert config.queue == QueueConfig()
    assert config.progress == ProgressConfig()
    assert config.store.backend == StoreConfig().backend
    assert config.store.synchronous == StoreConfig().synchronous
    assert config.store.retention_days == StoreConfig().retention_days
    assert config.store.path == EXAMPLE.parent / StoreConfig().path
    assert config.matrix is None
    assert sorted(config.targets) == ["deploy", "docs", "release", "site"]
    assert config.access.allowed_users == ["@alice:example.org", "@*:ops.example.org"]
    assert config.api == ApiConfig()


def test_example_config_values_equal_the_model_defaults():
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for section, model in (("store", StoreConfig), ("queue", QueueConfig),
                           ("progress", ProgressConfig), ("api", ApiConfig)):
        for key, value in raw[section].items():
            default = model.model_fields[key].default
            if isinstance(value, dict):  # a table: a model of its own
                assert type(default).model_validate(value) == default, f"{section}.{key}"
            else:
                assert type(default)(value) == default, f"{section}.{key}"


def test_example_config_documents_every_key():
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    for model in (MatrixConfig, AccessConfig, StoreConfig, QueueConfig, ProgressConfig,
                  ApiConfig, TargetConfig, WorkerConfig, LimitsConfig):
        missing = set(model.model_fields) - keys
        assert not missing, f"{model.__name__}: {missing} not in config.example.toml"
    for section in Config.model_fields:
        assert f"[{section}" in text or f"# [{section}" in text, section


def test_example_targets_together_use_every_target_key():
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    used = {key for target in raw["targets"].values() for key in target}
    assert used == set(TargetConfig.model_fields)


def test_commented_matrix_section_of_the_example_validates(conf_dir):
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index("# [matrix]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line.removeprefix("# "))
    path = write(conf_dir, "\n".join(block) + "\n")
    config = load_config(path, environ={})
    assert config.matrix is not None
    assert config.matrix.user_id == "@jobs:example.org"
    assert config.matrix.command_prefix == "!"
    assert config.matrix.device_name == "matrixjobs"
    raw_keys = set(tomllib.loads("\n".join(block))["matrix"])
    assert raw_keys == set(MatrixConfig.model_fields)


def test_commented_schedules_section_of_the_example_validates_with_its_targets(conf_dir):
    text = EXAMPLE.read_text(encoding="utf-8")
    head, _, rest = text.partition("# [schedules.nightly]\n")
    block = "[schedules.nightly]\n" + "\n".join(line.removeprefix("# ")
                                                for line in rest.partition("\n\n")[0]
                                                .splitlines())
    config = load_config(write(conf_dir, head + block + "\n"), environ={})
    schedule = config.schedules["nightly"]
    assert (schedule.target, schedule.args, schedule.timezone) == ("deploy", ["main"],
                                                                   "Europe/Berlin")
    # Every key but `batch`, which the example names beside `target` (one or the other).
    assert set(tomllib.loads(block)["schedules"]["nightly"]) == \
        set(ScheduleConfig.model_fields) - {"batch"}
    assert "batch = [" in block


def test_empty_config_is_valid_and_uses_defaults(conf_dir):
    config = load_config(write(conf_dir, ""), environ={})
    assert config.queue.workers == 4
    assert config.matrix is None
    assert config.targets == {}
    assert config.store.path == conf_dir / "matrixjobs.db"


# -- bad input, and the message the user gets --------------------------------------------------


def test_missing_file_says_config_file_not_found(tmp_path):
    message = config_error(tmp_path / "nope.toml")
    assert "nope.toml" in message
    assert "config file not found" in message


def test_toml_syntax_error_gives_the_line(conf_dir):
    message = invalid(conf_dir, """
        [queue]
        workers = 4
        max_retries =
    """)
    assert "TOML syntax error" in message
    assert "line 4" in message


def test_unknown_key_is_named_in_the_error(conf_dir):
    message = invalid(conf_dir, """
        [queue]
        wokers = 4
    """)
    assert "queue.wokers: unknown key" in message


def test_unknown_section_is_named_in_the_error(conf_dir):
    message = invalid(conf_dir, """
        [qeueu]
        workers = 4
    """)
    assert "qeueu: unknown key" in message


def test_unknown_key_in_a_target_names_the_target(conf_dir):
    message = invalid(conf_dir, f"""
        [targets.docs]
        comand = [{PYTHON}]
    """)
    assert "targets.docs.comand: unknown key" in message


def test_wrong_type_names_the_key_and_the_expected_type(conf_dir):
    message = invalid(conf_dir, """
        [queue]
        workers = "four"
    """)
    assert "queue.workers: expected an integer" in message
    assert "'four'" in message


def test_boolean_is_not_accepted_as_an_integer(conf_dir):
    message = invalid(conf_dir, """
        [queue]
        workers = true
    """)
    assert "queue.workers: expected an integer" in message


def test_command_given_as_a_string_names_the_target_command(conf_dir):
    message = invalid(conf_dir, """
        [targets.docs]
        command = "make docs"
    """)
    assert "targets.docs.command: expected a list" in message


def test_empty_command_is_rejected(conf_dir):
    message = invalid(conf_dir, """
        [targets.docs]
        command = []
    """)
    assert "targets.docs.command: must be a non-empty list" in message


def test_target_with_command_and_handler_is_rejected(conf_dir):
    message = invalid(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        handler = "sitebuild"
    """)
    assert "targets.docs: set exactly one of 'command'" in message


def test_target_with_neither_command_nor_handler_is_rejected(conf_dir):
    message = invalid(conf_dir, """
        [targets.docs]
        description = "nothing to run"
    """)
    assert "targets.docs: set exactly one of 'command'" in message


def test_invalid_progress_regex_is_rejected(conf_dir):
    message = invalid(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        progress_regex = '(?P<current>\\d+'
    """)
    assert "targets.docs.progress_regex: invalid regular expression" in message


def test_progress_regex_must_have_current_and_total_groups(conf_dir):
    message = invalid(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        progress_regex = '^(?P<current>\\d+) of (\\d+)$'
    """)
    assert "targets.docs.progress_regex: needs named groups" in message
    assert "missing: total" in message


def test_progress_regex_missing_both_groups_lists_both(conf_dir):
    message = invalid(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        progress_regex = '^(\\d+)/(\\d+)$'
    """)
    assert "missing: current, total" in message


def test_invalid_args_pattern_is_rejected(conf_dir):
    message = invalid(conf_dir, f"""
        [targets.deploy]
        command = [{PYTHON}]
        args_pattern = '[a-z'
    """)
    assert "targets.deploy.args_pattern: invalid regular expression" in message


def test_allowed_user_that_is_not_a_matrix_id_is_rejected(conf_dir):
    message = invalid(conf_dir, """
        [access]
        allowed_users = ["@alice:example.org", "alice"]
    """)
    assert "access.allowed_users" in message
    assert "'alice' is not a Matrix user id" in message


def test_bad_matrix_user_id_is_rejected(conf_dir):
    message = invalid(conf_dir, """
        [matrix]
        homeserver = "https://matrix.example.org"
        user_id = "jobs"
    """)
    assert "matrix.user_id: expected a Matrix user id" in message


def test_matrix_section_without_required_keys_names_them(conf_dir):
    message = invalid(conf_dir, """
        [matrix]
        device_name = "bot"
    """)
    assert "matrix.homeserver: missing required key" in message
    assert "matrix.user_id: missing required key" in message


def test_bad_handler_reference_is_rejected(conf_dir):
    message = invalid(conf_dir, """
        [handlers]
        mybuild = "mypackage.handlers.MyBuildHandler"
    """)
    assert "handlers.mybuild: expected 'package.module:Class'" in message
    assert "mypackage.handlers.MyBuildHandler" in message


def test_bad_target_name_is_rejected(conf_dir):
    message = invalid(conf_dir, f"""
        [targets."build docs"]
        command = [{PYTHON}]
    """)
    assert "target name 'build docs' must be letters, digits" in message


@pytest.mark.parametrize(("section", "key", "value"), [
    ("queue", "workers", "-1"),
    ("queue", "workers", "257"),
    ("queue", "max_retries", "-1"),
    ("queue", "lease_s", "0.5"),
    ("store", "retention_days", "0"),
    ("progress", "interval_ms", "1"),
])
def test_out_of_range_number_names_the_key(conf_dir, section, key, value):
    message = invalid(conf_dir, f"""
        [{section}]
        {key} = {value}
    """)
    assert f"{section}.{key}: Input should be" in message


def test_no_workers_with_sqlite_is_refused(conf_dir):
    message = invalid(conf_dir, """
        [queue]
        workers = 0
    """)
    assert "queue.workers = 0 runs no jobs here, and a SQLite store has no other workers" in message


def test_labels_and_runs_on_are_checked_and_sorted(conf_dir):
    message = invalid(conf_dir, """
        [worker]
        labels = ["gpu", "has space"]
    """)
    assert "worker.labels: label 'has space' must be letters, digits" in message
    config = Config.model_validate({"worker": {"name": "b1", "labels": ["gpu", "arm", "gpu"]},
                                    "targets": {"t": {"command": ["x"], "runs_on": ["gpu"]}}})
    assert config.worker.labels == ["arm", "gpu"]
    assert config.targets["t"].runs_on == ["gpu"]


def test_out_of_range_target_timeout_names_the_target(conf_dir):
    message = invalid(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        timeout_s = 0
    """)
    assert "targets.docs.timeout_s: Input should be greater than 0" in message


def test_unknown_store_backend_is_rejected(conf_dir):
    message = invalid(conf_dir, """
        [store]
        backend = "postgres"
    """)
    assert "store.backend" in message
    assert "'sqlite'" in message


def test_every_error_is_reported_at_once(conf_dir):
    message = invalid(conf_dir, """
        [queue]
        wokers = 4
        workers = "four"
        [targets.docs]
        command = "make docs"
    """)
    assert "queue.wokers: unknown key" in message
    assert "queue.workers: expected an integer" in message
    assert "targets.docs.command: expected a list" in message


# -- secrets -----------------------------------------------------------------------------------


def test_environment_secrets_override_the_file(conf_dir):
    path = write(conf_dir, MATRIX + """
        password = "from-file"
        access_token = "token-from-file"
    """)
    config = load_config(path, environ={"MATRIXJOBS_PASSWORD": "from-env",
                                        "MATRIXJOBS_ACCESS_TOKEN": "token-from-env"})
    assert config.matrix is not None
    assert config.matrix.password is not None
    assert config.matrix.password.get_secret_value() == "from-env"
    assert config.matrix.access_token is not None
    assert config.matrix.access_token.get_secret_value() == "token-from-env"


def test_file_secrets_are_used_without_environment(conf_dir):
    path = write(conf_dir, MATRIX + """
        password = "from-file"
    """)
    config = load_config(path, environ={})
    assert config.matrix is not None and config.matrix.password is not None
    assert config.matrix.password.get_secret_value() == "from-file"
    assert config.matrix.access_token is None


def test_dotenv_beside_the_config_provides_secrets(conf_dir):
    path = write(conf_dir, MATRIX)
    (conf_dir / ".env").write_text(
        "MATRIXJOBS_PASSWORD=dotenv-password\n"
        "MATRIXJOBS_ACCESS_TOKEN=dotenv-token\n"
        "MATRIXJOBS_API_TOKEN=dotenv-api\n",
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    assert config.matrix is not None
    assert config.matrix.password is not None
    assert config.matrix.password.get_secret_value() == "dotenv-password"
    assert config.matrix.access_token is not None
    assert config.matrix.access_token.get_secret_value() == "dotenv-token"
    assert config.api_token is not None
    assert config.api_token.get_secret_value() == "dotenv-api"


def test_environment_wins_over_dotenv(conf_dir):
    path = write(conf_dir, MATRIX + """
        password = "from-file"
    """)
    (conf_dir / ".env").write_text(
        "MATRIXJOBS_PASSWORD=from-dotenv\nMATRIXJOBS_API_TOKEN=api-from-dotenv\n",
        encoding="utf-8",
    )
    config = load_config(path, environ={"MATRIXJOBS_PASSWORD": "from-env",
                                        "MATRIXJOBS_API_TOKEN": "api-from-env"})
    assert config.matrix is not None and config.matrix.password is not None
    assert config.matrix.password.get_secret_value() == "from-env"
    assert config.api_token is not None
    assert config.api_token.get_secret_value() == "api-from-env"


def test_dotenv_beside_the_config_wins_over_dotenv_in_the_cwd(conf_dir):
    path = write(conf_dir, MATRIX)
    Path(".env").write_text("MATRIXJOBS_PASSWORD=from-cwd\n", encoding="utf-8")
    (conf_dir / ".env").write_text("MATRIXJOBS_PASSWORD=from-config-dir\n", encoding="utf-8")
    config = load_config(path, environ={})
    assert config.matrix is not None and config.matrix.password is not None
    assert config.matrix.password.get_secret_value() == "from-config-dir"


def test_dotenv_only_supplies_matrixjobs_secrets(conf_dir, monkeypatch):
    monkeypatch.delenv("MATRIXJOBS_UNRELATED", raising=False)
    path = write(conf_dir, "")
    (conf_dir / ".env").write_text("MATRIXJOBS_UNRELATED=x\nHOME=/nowhere\n", encoding="utf-8")
    config = load_config(path, environ={})
    assert config.api_token is None
    assert os.environ.get("HOME") != "/nowhere"
    assert "MATRIXJOBS_UNRELATED" not in os.environ


def test_api_token_comes_from_the_environment(conf_dir):
    path = write(conf_dir, "")
    assert load_config(path, environ={}).api_token is None
    config = load_config(path, environ={"MATRIXJOBS_API_TOKEN": "s3cret-api"})
    assert config.api_token is not None
    assert config.api_token.get_secret_value() == "s3cret-api"


def test_secrets_never_appear_in_repr_or_json(conf_dir):
    path = write(conf_dir, MATRIX + """
        access_token = "file-token-123"
    """)
    config = load_config(path, environ={"MATRIXJOBS_PASSWORD": "env-password-456",
                                        "MATRIXJOBS_API_TOKEN": "env-api-789"})
    shown = [repr(config), str(config), config.model_dump_json(), repr(config.matrix),
             str(config.api_token), repr(config.api_token)]
    for text in shown:
        for secret in ("file-token-123", "env-password-456", "env-api-789"):
            assert secret not in text


def test_wrongly_typed_secret_is_not_echoed_in_the_error(conf_dir):
    message = invalid(conf_dir, MATRIX + """
        password = 31415926535
    """)
    assert "matrix.password" in message
    assert "31415926535" not in message


# -- api ---------------------------------------------------------------------------------------


def test_api_is_on_by_default_on_loopback_without_token(conf_dir):
    config = load_config(write(conf_dir, ""), environ={})
    assert config.api.enabled
    assert config.api.address == TcpAddress("127.0.0.1", 8765)
    assert config.api_token is None


@pytest.mark.parametrize(("listen", "address"), [
    ("127.0.0.1:8765", TcpAddress("127.0.0.1", 8765)),
    ("localhost:0", TcpAddress("localhost", 0)),
    ("[::1]:8765", TcpAddress("::1", 8765)),
    ("0.0.0.0:80", TcpAddress("0.0.0.0", 80)),
    ("unix:/run/matrixjobs/api.sock", UnixAddress(Path("/run/matrixjobs/api.sock"))),
])
def test_api_listen_forms(listen, address):
    assert parse_listen(listen) == address


@pytest.mark.parametrize("listen", [
    "8765", ":8765", "127.0.0.1", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:http",
    "::1:8765", "[127.0.0.1]:80", "unix:", "http://127.0.0.1:8765",
])
def test_bad_api_listen_is_explained(conf_dir, listen):
    message = invalid(conf_dir, f"""
        [api]
        listen = "{listen}"
    """)
    assert "api.listen: " in message
    assert "HOST:PORT" in message or "brackets" in message


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:1", True), ("127.1.2.3:1", True), ("[::1]:1", True), ("localhost:1", True),
    ("unix:/tmp/a.sock", True), ("0.0.0.0:1", False), ("[::]:1", False),
    ("192.168.1.5:1", False), ("example.org:1", False),
])
def test_api_loopback_addresses(listen, loopback):
    assert parse_listen(listen).loopback is loopback


def test_non_loopback_api_without_token_is_refused(conf_dir):
    message = config_error(write(conf_dir, """
        [api]
        listen = "0.0.0.0:8765"
    """))
    assert "config.toml: api.listen: 0.0.0.0:8765 is not a loopback address" in message
    assert "MATRIXJOBS_API_TOKEN" in message


def test_non_loopback_api_with_a_token_is_accepted(conf_dir):
    path = write(conf_dir, """
        [api]
        listen = "0.0.0.0:8765"
    """)
    config = load_config(path, environ={"MATRIXJOBS_API_TOKEN": "from-env"})
    assert config.api.address == TcpAddress("0.0.0.0", 8765)
    with_file_token = write(conf_dir, """
        [api]
        listen = "0.0.0.0:8765"
        token = "from-file"
    """, name="other.toml")
    assert load_config(with_file_token, environ={}).api_token is not None


def test_disabled_api_may_name_any_address(conf_dir):
    config = load_config(write(conf_dir, """
        [api]
        enabled = false
        listen = "0.0.0.0:8765"
    """), environ={})
    assert not config.api.enabled


def test_api_token_from_the_environment_wins_over_the_file(conf_dir):
    path = write(conf_dir, """
        [api]
        token = "from-file"
    """)
    from_file = load_config(path, environ={}).api_token
    assert from_file is not None and from_file.get_secret_value() == "from-file"
    from_env = load_config(path, environ={"MATRIXJOBS_API_TOKEN": "from-env"}).api_token
    assert from_env is not None and from_env.get_secret_value() == "from-env"


def test_api_token_is_never_shown(conf_dir):
    config = load_config(write(conf_dir, """
        [api]
        token = "file-api-token-321"
    """), environ={})
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.api)):
        assert "file-api-token-321" not in text
    assert "file-api-token-321" not in invalid(conf_dir, """
        [api]
        token = "file-api-token-321"
        tokens = 1
    """)


def test_empty_api_token_is_rejected(conf_dir):
    assert "api.token: must not be empty" in invalid(conf_dir, """
        [api]
        token = ""
    """)


def test_relative_api_socket_resolves_against_the_config_directory(conf_dir):
    config = load_config(write(conf_dir, """
        [api]
        listen = "unix:run/api.sock"
    """), environ={})
    assert config.api.address == UnixAddress(conf_dir.resolve() / "run" / "api.sock")


# -- paths -------------------------------------------------------------------------------------


def test_relative_store_path_resolves_against_the_config_directory(conf_dir):
    path = write(conf_dir, """
        [store]
        path = "data/jobs.db"
    """)
    assert load_config(path, environ={}).store.path == conf_dir / "data" / "jobs.db"


def test_relative_config_path_still_resolves_to_an_absolute_store_path(tmp_path, conf_dir):
    write(conf_dir, """
        [store]
        path = "jobs.db"
    """)
    config = load_config(Path("..") / "conf" / "config.toml", environ={})
    assert config.store.path.is_absolute()
    assert config.store.path == conf_dir.resolve() / "jobs.db"


def test_store_path_goes_to_state_directory_when_set(conf_dir, tmp_path):
    state = tmp_path / "state"
    path = write(conf_dir, """
        [store]
        path = "jobs.db"
    """)
    environ = {"STATE_DIRECTORY": str(state)}
    assert load_config(path, environ=environ).store.path == state / "jobs.db"


def test_absolute_store_path_ignores_state_directory(conf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    absolute = tmp_path / "elsewhere" / "jobs.db"
    path = write(conf_dir, f"""
        [store]
        path = {json.dumps(str(absolute))}
    """)
    assert load_config(path, environ={}).store.path == absolute


def test_target_cwd_defaults_to_the_config_directory(conf_dir):
    path = write(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        [targets.site]
        handler = "sitebuild"
    """)
    config = load_config(path, environ={})
    assert config.targets["docs"].cwd == conf_dir
    assert config.targets["site"].cwd == conf_dir


def test_relative_target_cwd_resolves_against_the_config_directory(conf_dir, tmp_path):
    absolute = tmp_path / "abs"
    path = write(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        cwd = "docs/src"
        [targets.abs]
        command = [{PYTHON}]
        cwd = {json.dumps(str(absolute))}
    """)
    config = load_config(path, environ={})
    assert config.targets["docs"].cwd == conf_dir / "docs" / "src"
    assert config.targets["abs"].cwd == absolute


# -- warnings ----------------------------------------------------------------------------------


def test_missing_executable_is_warned_about(conf_dir):
    path = write(conf_dir, """
        [targets.ghost]
        command = ["matrixjobs-no-such-program-xyz", "--flag"]
        [targets.gone]
        command = ["/nonexistent/dir/build.sh"]
    """)
    warnings = load_config(path, environ={}).warnings()
    assert ("targets.ghost: executable 'matrixjobs-no-such-program-xyz' not found on PATH"
            in warnings)
    assert "targets.gone: executable '/nonexistent/dir/build.sh' not found" in warnings


def test_a_room_for_triggered_work_without_a_bot_is_warned_about(conf_dir):
    path = write(conf_dir, """
        [targets.docs]
        command = ["true"]
        [schedules.nightly]
        cron = "0 3 * * *"
        target = "docs"
        room = "#ci:example.org"
        [schedules.quiet]
        cron = "0 4 * * *"
        target = "docs"
    """)
    warnings = load_config(path, environ={}).warnings()
    assert [w for w in warnings if "room" in w] == [
        "schedules.nightly.room: there is no [matrix] section, so no bot shows its work in "
        "a room"]


def test_existing_executable_gives_no_warning(conf_dir):
    path = write(conf_dir, f"""
        [targets.py]
        command = [{PYTHON}, "-c", "pass"]
        [targets.site]
        handler = "sitebuild"
    """)
    assert load_config(path, environ={}).warnings() == []


def test_relative_program_is_looked_up_in_the_target_cwd(conf_dir):
    tools = conf_dir / "tools"
    tools.mkdir()
    (tools / "build.sh").write_text("#!/bin/sh\n", encoding="utf-8")
    (tools / "build.sh").chmod(0o755)
    path = write(conf_dir, """
        [targets.build]
        command = ["tools/build.sh"]
    """)
    # The process cwd is elsewhere; the program is found relative to the config directory.
    assert load_config(path, environ={}).warnings() == []


def test_missing_target_cwd_is_warned_about(conf_dir):
    path = write(conf_dir, f"""
        [targets.docs]
        command = [{PYTHON}]
        cwd = "not-there"
    """)
    warnings = load_config(path, environ={}).warnings()
    assert any(w.startswith("targets.docs: cwd") and "is not a directory" in w
               for w in warnings), warnings


POSTGRES_STORE = """
    [store]
    backend = "postgresql"
    url = "postgresql://matrixjobs@db.example.org/matrixjobs"
"""


def routing_warnings(conf_dir: Path, text: str) -> list[str]:
    config = load_config(write(conf_dir, text), environ={})
    return [str(w) for w in config.warning_items() if w.topic is WarningTopic.ROUTING]


def test_runs_on_a_label_this_sqlite_node_lacks_warns_that_jobs_wait_forever(conf_dir):
    assert routing_warnings(conf_dir, """
        [targets.train]
        handler = "sitebuild"
        runs_on = ["gpu"]
    """) == ["targets.train: runs_on gpu, but this node's worker labels are none and a SQLite "
             "store has no other workers: its jobs would wait forever"]


def test_runs_on_warning_names_the_labels_this_sqlite_node_has(conf_dir):
    assert routing_warnings(conf_dir, """
        [worker]
        labels = ["arm64"]
        [targets.train]
        handler = "sitebuild"
        runs_on = ["gpu", "arm64"]
    """) == ["targets.train: runs_on arm64, gpu, but this node's worker labels are arm64 and a "
             "SQLite store has no other workers: its jobs would wait forever"]


def test_runs_on_a_label_this_postgresql_node_lacks_warns_softly(conf_dir):
    assert routing_warnings(conf_dir, POSTGRES_STORE + """
        [worker]
        labels = ["arm64"]
        [targets.train]
        handler = "sitebuild"
        runs_on = ["gpu"]
        [targets.cross]
        handler = "sitebuild"
        runs_on = ["gpu", "arm64"]
    """) == [
        "targets.train: runs only on workers labelled gpu; this node has none of them, so "
        "another worker must take its jobs",
        "targets.cross: runs only on workers labelled arm64, gpu; this node lacks gpu, so "
        "another worker must take its jobs",
    ]


def test_runs_on_gives_no_warning_when_this_node_has_every_label(conf_dir):
    assert routing_warnings(conf_dir, """
        [worker]
        labels = ["gpu", "arm64", "big"]
        [targets.train]
        handler = "sitebuild"
        runs_on = ["gpu", "arm64"]
        [targets.docs]
        handler = "sitebuild"
    """) == []


def test_runs_on_gives_no_warning_on_a_node_that_runs_no_jobs(conf_dir):
    """A bot/API-only node (workers = 0) leaves every job to the worker processes."""
    assert routing_warnings(conf_dir, POSTGRES_STORE + """
        [queue]
        workers = 0
        [targets.train]
        handler = "sitebuild"
        runs_on = ["gpu"]
    """) == []


# -- access ------------------------------------------------------------------------------------


def test_exact_user_id_allows_only_that_user():
    access = AccessConfig(allowed_users=["@alice:example.org"])
    assert access.allows("@alice:example.org")
    assert not access.allows("@alice:example.org.evil.com")
    assert not access.allows("@alice:example.or")
    assert not access.allows("@alicex:example.org")
    assert not access.allows("@Alice:example.org")  # case-sensitive, as documented
    assert not access.allows("@bob:example.org")


def test_server_glob_allows_every_user_on_that_server():
    access = AccessConfig(allowed_users=["@*:example.org"])
    assert access.allows("@alice:example.org")
    assert access.allows("@bob:example.org")
    assert not access.allows("@eve:example.org.evil.com")
    assert not access.allows("@eve:evil-example.org")
    assert not access.allows("@eve:sub.example.org")
    assert not access.allows("@eve:EXAMPLE.ORG")


def test_several_patterns_allow_the_union():
    access = AccessConfig(allowed_users=["@alice:example.org", "@*:ops.example.org"])
    assert access.allows("@alice:example.org")
    assert access.allows("@carol:ops.example.org")
    assert not access.allows("@bob:example.org")
    assert not access.allows("@carol:ops.example.org.evil.com")


def test_empty_allow_list_allows_nobody():
    assert not AccessConfig().allows("@alice:example.org")


def test_matrix_without_credentials_is_warned_about(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[matrix]\nhomeserver = "https://hs.example"\nuser_id = "@bot:hs.example"\n')
    warnings = load_config(path, environ={}).warnings()
    assert any("no password or access token" in w for w in warnings)
    with_env = load_config(path, environ={"MATRIXJOBS_PASSWORD": "pw"}).warnings()
    assert not any("no password" in w for w in with_env)


def test_a_short_api_token_is_warned_about_without_showing_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    short = load_config(path, environ={"MATRIXJOBS_API_TOKEN": "hunter2abc"}).warnings()
    [warning] = [w for w in short if w.startswith("api:")]
    assert "shorter than 16 characters" in warning and "hunter2abc" not in warning
    long = load_config(path, environ={"MATRIXJOBS_API_TOKEN": "x" * 16}).warnings()
    assert not any(w.startswith("api:") for w in long)


def test_program_that_is_not_executable_is_warned_about(conf_dir):
    # The queue's exec fails on it just like on a missing one.
    (conf_dir / "build.sh").write_text("#!/bin/sh\n", encoding="utf-8")
    (conf_dir / "build.sh").chmod(0o644)
    path = write(conf_dir, """
        [targets.build]
        command = ["./build.sh"]
    """)
    assert load_config(path, environ={}).warnings() == [
        f"targets.build: '{conf_dir / 'build.sh'}' is not executable"]


def test_warnings_carry_their_topic(conf_dir):
    path = write(conf_dir, MATRIX + """
        [targets.ghost]
        command = ["matrixjobs-no-such-program-xyz"]
    """)
    topics = [w.topic for w in load_config(path, environ={}).warning_items()]
    assert topics == [WarningTopic.CREDENTIALS, WarningTopic.TARGET]


# -- homeserver URL ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://matrix.example.org:8o",  # port typo
    "https://[::1",
    "https://matrix..example.org",
    "https://matrix example.org",
    "https://",
])
def test_homeserver_url_an_http_client_cannot_use_is_rejected(conf_dir, url):
    message = invalid(conf_dir, MATRIX.replace("https://matrix.example.org", url))
    assert f"matrix.homeserver: '{url}' is not a valid URL" in message


@pytest.mark.parametrize("url", ["http://[::1]:8008", "https://matrix.example.org:8448/",
                                 "https://bücher.example", "http://synapse_1:8008"])
def test_homeserver_url_variants_are_accepted(conf_dir, url):
    path = write(conf_dir, MATRIX.replace("https://matrix.example.org", url))
    config = load_config(path, environ={})
    assert config.matrix is not None and config.matrix.homeserver == url.rstrip("/")


# -- .env that cannot be read ------------------------------------------------------------------


def test_dotenv_that_is_not_utf8_is_a_config_error(conf_dir):
    (conf_dir / ".env").write_bytes(b"MATRIXJOBS_PASSWORD=caf\xe9\n")
    message = config_error(write(conf_dir, MATRIX))
    assert message.startswith(f"{conf_dir / '.env'}: cannot read:"), message
    assert "utf-8" in message


def load_error_as_nobody(path: Path) -> str:
    """load_config's error in a forked child running as nobody (root may read any file)."""
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read)
            os.chdir(path.parent)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                load_config(path, environ={})
                message = "loaded"
            except ConfigError as exc:
                message = str(exc)
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read, encoding="utf-8") as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_dotenv_that_may_not_be_read_is_a_config_error(tmp_path):
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="config-env-")) if as_root else tmp_path
    try:
        base.chmod(0o755)
        path = write(base, MATRIX)
        dotenv = base / ".env"
        dotenv.write_text("MATRIXJOBS_PASSWORD=secret\n", encoding="utf-8")
        dotenv.chmod(0o600 if as_root else 0o000)  # root's own, or nobody's at all
        message = load_error_as_nobody(path) if as_root else config_error(path)
        assert message == f"{dotenv}: cannot read: Permission denied"
    finally:
        if as_root:
            shutil.rmtree(base)


# -- [matrix] verified_devices -----------------------------------------------------------------

SESSION_KEY = "l9x11zHB9ljF9XoaXMzGkCWJ6g0tCbMhT+RNwvVYeL0"


def test_verified_devices_take_the_session_key_as_element_groups_it(conf_dir):
    grouped = " ".join(SESSION_KEY[i:i + 4] for i in range(0, len(SESSION_KEY), 4))
    config = load_config(write(conf_dir, MATRIX + f"""
        trust = "verified"
        verified_devices = {{ "@alice:example.org" = ["ABCDEFGHIJ:{grouped}",
                                                      "KLMNOPQRST:{SESSION_KEY}"] }}
    """), environ={})
    assert config.matrix is not None
    assert config.matrix.pinned_devices() == {
        "@alice:example.org": {"ABCDEFGHIJ": SESSION_KEY, "KLMNOPQRST": SESSION_KEY}}


@pytest.mark.parametrize(("value", "expected"), [
    ('{ "alice" = [] }', "'alice' is not a Matrix user id"),
    ('{ "@*:example.org" = [] }', "'@*:example.org' is not a Matrix user id"),
    (f'{{ "@alice:example.org" = ["{SESSION_KEY}"] }}', 'is not "DEVICEID:SESSIONKEY"'),
    (f'{{ "@alice:example.org" = [":{SESSION_KEY}"] }}', 'is not "DEVICEID:SESSIONKEY"'),
    ('{ "@alice:example.org" = ["ABCDEFGHIJ:abcd"] }',
     "@alice:example.org: the key of device ABCDEFGHIJ is not a session key"),
    (f'{{ "@alice:example.org" = ["ABCDEFGHIJ:{SESSION_KEY[:-1]}!"] }}',
     "the key of device ABCDEFGHIJ is not a session key"),
    (f'{{ "@alice:example.org" = ["ABCDEFGHIJ:{SESSION_KEY}", '
     f'"ABCDEFGHIJ:{SESSION_KEY[:-1]}A"] }}', "device ABCDEFGHIJ is listed with two keys"),
])
def test_malformed_verified_devices_are_named_in_the_error(conf_dir, value, expected):
    message = invalid(conf_dir, MATRIX + f"verified_devices = {value}\n")
    assert "matrix.verified_devices: " in message
    assert expected in message


def test_verified_devices_must_be_lists_of_strings(conf_dir):
    message = invalid(conf_dir, MATRIX + 'verified_devices = { "@alice:example.org" = "X:Y" }\n')
    assert "matrix.verified_devices.@alice:example.org" in message


# -- the PostgreSQL store ------------------------------------------------------------------------

POSTGRES = """
    [store]
    backend = "postgresql"
    url = "postgresql://matrixjobs@db.example.org:5433/jobs"
"""


def test_postgresql_url_from_the_file_and_the_whole_url_from_the_environment(conf_dir):
    path = write(conf_dir, POSTGRES)
    config = load_config(path, environ={})
    assert config.store.database_url.get_secret_value() == (
        "postgresql://matrixjobs@db.example.org:5433/jobs")
    assert config.secrets() == []
    env_url = "postgresql://matrixjobs:pa%40ss-w0rd-long@db.example.org:5433/jobs"
    config = load_config(path, environ={"MATRIXJOBS_DATABASE_URL": env_url})
    assert config.store.database_url.get_secret_value() == env_url
    assert [s.get_secret_value() for s in config.secrets()] == ["pa@ss-w0rd-long"]
    for text in (repr(config), config.model_dump_json(), describe_store(config.store)):
        assert "pa%40ss" not in text and "pa@ss" not in text
    assert describe_store(config.store) == "PostgreSQL at db.example.org:5433/jobs"


def test_database_url_in_dotenv_is_enough_without_a_url_in_the_file(conf_dir):
    path = write(conf_dir, '[store]\nbackend = "postgresql"\n')
    (conf_dir / ".env").write_text("MATRIXJOBS_DATABASE_URL=postgresql://u:secret-pw@h/db\n",
                                   encoding="utf-8")
    config = load_config(path, environ={})
    assert config.store.database_url.get_secret_value() == "postgresql://u:secret-pw@h/db"


def test_a_password_in_the_files_url_is_refused_without_echoing_it(conf_dir):
    path = write(conf_dir, POSTGRES.replace("matrixjobs@", "matrixjobs:hunter2-pw@"))
    with pytest.raises(ConfigError, match=r"store\.url: must not hold a password") as raised:
        load_config(path, environ={})
    assert "hunter2-pw" not in str(raised.value)
    assert "MATRIXJOBS_DATABASE_URL" in str(raised.value)


@pytest.mark.parametrize("text, expected", [
    ('[store]\nbackend = "postgresql"\n', 'store.backend = "postgresql" needs store.url'),
    ('[store]\nbackend = "postgresql"\nurl = "mysql://h/db"\n',
     "store.url: expected a URL like postgresql://"),
    ('[store]\nbackend = "postgresql"\nurl = "postgresql://h:port/db"\n',
     "store.url: expected a URL like postgresql://"),
    ('[store]\nbackend = "mongodb"\n', "store.backend: Input should be 'sqlite' or 'postgresql'"),
])
def test_store_mistakes_are_reported_so_a_person_can_act(conf_dir, text, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(conf_dir, text), environ={})


def test_a_malformed_database_url_in_the_environment_is_not_echoed(conf_dir):
    path = write(conf_dir, POSTGRES)
    with pytest.raises(ConfigError, match="MATRIXJOBS_DATABASE_URL: expected a URL") as raised:
        load_config(path, environ={"MATRIXJOBS_DATABASE_URL": "http://u:leaky-pw@h/db"})
    assert "leaky-pw" not in str(raised.value)


@pytest.mark.parametrize(("value", "parsed"), [
    ('"512M"', 512 * 1024**2), ('"1G"', 1024**3), ('"1GiB"', 1024**3), ('"64k"', 65536),
    ("1048576", 1048576), ('"3 G"', 3 * 1024**3),
])
def test_limit_sizes_read_as_systemd_reads_them(conf_dir, value, parsed):
    path = write(conf_dir, f"""
        [targets.t]
        command = ["true"]
        limits = {{ memory = {value}, file_size = {value} }}
    """)
    limits = load_config(path, environ={}).targets["t"].limits
    assert (limits.memory, limits.file_size) == (parsed, parsed)


@pytest.mark.parametrize(("limits", "error"), [
    ('{ memory = "lots" }', 'targets.t.limits.memory: expected bytes as a number or with a '
                            'unit, like "512M" or "2G" (units of 1024)'),
    ('{ memory = "0M" }', "targets.t.limits.memory: must be more than 0"),
    ('{ memory = true }', "targets.t.limits.memory: expected bytes"),
    ("{ processes = 1 }", "targets.t.limits.processes: Input should be greater than or equal"),
    ('{ cpu_s = "10" }', "targets.t.limits.cpu_s: expected an integer, got '10'"),
    ("{ open_files = 8 }", "targets.t.limits.open_files: Input should be greater than or equal"),
    ("{ swap = 1 }", "targets.t.limits.swap: unknown key"),
    ("{ processes = 5000000 }", "targets.t.limits.processes: Input should be less than or "
                                "equal to 4194304"),
    ("{ open_files = 2000000 }", "targets.t.limits.open_files: Input should be less than or "
                                 "equal to 1048576"),
])
def test_a_bad_limit_is_a_config_error_naming_the_key(conf_dir, limits, error):
    path = write(conf_dir, f"""
        [targets.t]
        command = ["true"]
        limits = {limits}
    """)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert error in str(caught.value)


def test_a_targets_limits_go_over_the_queues_key_by_key():
    defaults = LimitsConfig(memory=2 * 1024**3, processes=512)
    own = LimitsConfig(memory=256 * 1024**2, cpu_s=60)
    assert own.over(defaults) == LimitsConfig(memory=256 * 1024**2, cpu_s=60, processes=512)


def test_a_power_level_needs_the_rooms_it_counts_in():
    """Anyone allowed may make a room where they outrank everyone and invite the bot."""
    with pytest.raises(ValidationError, match="power_level needs rooms"):
        TargetConfig.model_validate({"command": ["true"], "power_level": 50})
    TargetConfig.model_validate({"command": ["true"], "power_level": 50,
                                 "rooms": ["#deploys:example.org"]})
