"""Schemathesis over the served OpenAPI document against the real service on a real socket:
no 5xx, every answer documented (status, content type, schema), errors in the error shape."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import schemathesis
from helpers import make_config, python_target
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from matrixjobs.api import ApiServer, server
from matrixjobs.api.openapi import OPERATIONS, document
from matrixjobs.api.session import LoginThrottle
from matrixjobs.app import App
from matrixjobs.service import build_service

TOKEN = "schemathesis-token"
TARGETS = {
    "quick": python_target("print('::progress 1/1 done')"),
    "count": python_target("print('::progress 1/1')", args_pattern="[0-9]{1,3}"),
}
MAX_EXAMPLES = 100


class ServiceThread:
    """The service in its own event loop on a thread, so synchronous clients can call it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: App | None = None
        self.url = ""

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def start(self) -> None:
        self.thread.start()
        self.url = self.run(self._start())

    async def _start(self) -> str:
        config = make_config(self.tmp_path, targets=TARGETS,
                             api={"listen": "127.0.0.1:0", "token": TOKEN})
        self.app = build_service(config)
        await self.app.start()
        [api] = [c for c in self.app.components if isinstance(c, ApiServer)]
        return api.url

    def stop(self) -> None:
        if self.app is not None:
            self.run(self.app.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceThread]:
    service = ServiceThread(tmp_path_factory.mktemp("schemathesis"))
    with pytest.MonkeyPatch.context() as patch:
        # Schemathesis' auth check sends wrong tokens by the hundred from one address, which
        # the throttle would answer 429 after five (tests/test_dashboard_api.py covers it).
        patch.setattr(server, "LoginThrottle", lambda: LoginThrottle(attempts=10**9))
        service.start()
    yield service
    service.stop()


# Loaded at import for parametrize (schemathesis' lazy fixture loading fails on pytest 9);
# the first test checks that the service serves this very document.
SPEC = document(set(OPERATIONS))
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
# The dashboard's event stream never ends by itself: tests/test_dashboard_api.py covers it.
schema = schemathesis.openapi.from_dict(SPEC).exclude(path="/v1/events")


def test_the_service_serves_the_document_under_test(served: ServiceThread) -> None:
    assert httpx2.get(f"{served.url}/v1/openapi.json", headers=HEADERS).json() == SPEC


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_api_answers_as_documented(case: Any, served: ServiceThread) -> None:
    # A body the schema allows may still be refused with 422 for what the config decides:
    # arguments a target's args_pattern rejects, a batch over [queue] max_batch_size.
    case.call_and_validate(base_url=served.url, headers=HEADERS,
                           excluded_checks=[positive_data_acceptance])
