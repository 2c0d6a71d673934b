"""pytest fixtures around the real-Synapse harness (matrixjobs/demo/synapse.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from matrixjobs.demo.synapse import SynapseServer, synapse_installed


def make_synapse_fixture(
    *,
    rate_limits: bool = False,
    scope: str = "session",
    name: str | None = None,
    **server_kwargs: Any,
) -> Callable[..., Iterator[SynapseServer]]:
    """Build a pytest fixture yielding a started ``SynapseServer``.

    In conftest.py::

        synapse = make_synapse_fixture()                        # fixture named "synapse"
        synapse_rl = make_synapse_fixture(rate_limits=True)     # named "synapse_rl"

    Fails the requesting tests when matrix-synapse is not installed.
    """

    def _fixture() -> Iterator[SynapseServer]:
        if not synapse_installed():  # a skip would hide that the e2e tests never ran
            pytest.fail("matrix-synapse is not installed: pip install -e '.[test]'")
        server = SynapseServer(rate_limits=rate_limits, **server_kwargs)
        with server:
            yield server

    fixture: Callable[..., Iterator[SynapseServer]] = pytest.fixture(
        scope=scope,  # type: ignore[arg-type]  # pytest types scope as a Literal
        name=name,
    )(_fixture)
    return fixture
