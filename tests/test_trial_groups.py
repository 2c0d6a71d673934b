"""Concurrency groups as an operator writes them: a group template may name the job's
arguments ({0}, {1}…) and nothing else, or a submit that the config check let through
fails later as an internal error (500), or a user's argument picks the padding width."""

from __future__ import annotations

import pytest

from matrixjobs.config import Config


@pytest.mark.parametrize("template", [
    "deploy-{0:d}",       # a format spec: "Unknown format code 'd' for object of type 'str'"
    "deploy-{0:>{1}}",    # a width from the second argument: a user sizes the group's name
    "deploy-{0!z}",       # a conversion that does not exist
    "deploy-{0!r}",       # quotes in the group's name
])
def test_a_group_template_with_a_format_spec_or_conversion_is_refused_when_read(template):
    with pytest.raises(ValueError, match=r"may name only the job's arguments, as \{0\}"):
        Config.model_validate({"targets": {"deploy": {
            "command": ["true"], "args_pattern": ".*", "concurrency": template}}})

