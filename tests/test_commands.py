"""Reading room messages as commands."""

import pytest

from matrixjobs.matrix.commands import MAX_LENGTH, Command, CommandSyntaxError, parse


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!build docs", Command("build", ("docs",))),
        ("  !BUILD docs  ", Command("build", ("docs",))),
        ("!build deploy 'my branch' x", Command("build", ("deploy", "my branch", "x"))),
        ("!batch docs api site", Command("batch", ("docs", "api", "site"))),
        ("!status", Command("status", ())),
        ("!cancel j12", Command("cancel", ("j12",))),
        ("!frobnicate now", Command("frobnicate", ("now",))),
        ("!build $(id);rm -rf /", Command("build", ("$(id);rm", "-rf", "/"))),
    ],
)
def test_commands_are_split_into_name_and_arguments(body, expected):
    assert parse(body, "!") == expected


@pytest.mark.parametrize(
    "body", ["hello", "", "!", "! build docs", "build docs", "!it's broken again", "!!!", "!?"])
def test_ordinary_messages_are_not_commands(body):
    assert parse(body, "!") is None


def test_custom_prefix():
    assert parse("jobs: build docs", "jobs: ") == Command("build", ("docs",))
    assert parse("jobs:build docs", "jobs:") == Command("build", ("docs",))
    assert parse("!build docs", "jobs:") is None


def test_a_command_longer_than_any_valid_one_is_refused_unread():
    assert parse("!build " + "a" * (MAX_LENGTH - 6), "!") == Command("build", ("a" * 9994,))
    with pytest.raises(CommandSyntaxError, match="too long"):
        parse("!build " + "a" * (MAX_LENGTH - 5), "!")
    assert parse("hello " + "a" * 65536, "!") is None


def test_unclosed_quote_is_a_clear_error():
    with pytest.raises(CommandSyntaxError, match="cannot read that command"):
        parse("!build deploy 'oops", "!")
