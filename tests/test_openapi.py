"""GET /v1/openapi.json: the document covers every route, and real answers conform to it."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import httpx2
import jsonschema
import pytest
from helpers import final_state, python_target, write_locked
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from matrixjobs.api.dashboard import Dashboard
from matrixjobs.api.openapi import OPERATIONS, document, operations_of
from matrixjobs.api.server import build_asgi_app
from matrixjobs.api.session import LoginThrottle
from matrixjobs.api.stream import OpenStreams

TOKEN = "openapi-test-token"
TARGETS = {
    "quick": python_target("print('::progress 1/1 done')"),
    "slow": python_target("import time; time.sleep(60)"),
    "count": python_target("print('::progress 1/1')", args_pattern="[0-9]{1,3}"),
}


@pytest.fixture
def service(api_service: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: `app, client = await service(token=None, **sections)`, with TARGETS."""

    def start(token: str | None = None, **sections: Any) -> Any:
        sections.setdefault("targets", TARGETS)
        return api_service(token, **sections)

    return start


class Document:
    """The served document, and validation of an answer against it."""

    URI = "urn:matrixjobs:openapi"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.registry = Registry().with_resource(self.URI, Resource(spec, DRAFT202012))

    def operation(self, method: str, url_path: str) -> tuple[str, dict[str, Any]]:
        for template, operations in self.spec["paths"].items():
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
            if re.match(pattern, url_path) and method.lower() in operations:
                return template, operations[method.lower()]
        raise AssertionError(f"{method} {url_path} is not in the document")

    def check(self, response: httpx2.Response) -> None:
        request = response.request
        template, operation = self.operation(request.method, request.url.path)
        status = str(response.status_code)
        assert status in operation["responses"], (
            f"{request.method} {request.url.path}: {status} is not documented")
        media = response.headers["content-type"].partition(";")[0]
        assert media in operation["responses"][status]["content"], (
            f"{media} not documented for {status}")
        if media == "application/json":
            where = "/".join(part.replace("~", "~0").replace("/", "~1") for part in (
                "paths", template, request.method.lower(), "responses", status, "content",
                media, "schema"))
            self.validate(response.json(), "/" + where)

    def validate(self, instance: Any, pointer: str) -> None:
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{self.URI}#{pointer}"}, registry=self.registry,
            format_checker=jsonschema.FormatChecker())
        validator.validate(instance)


EVENT = "/components/schemas/JobProgressEvent"


async def fetch_document(client: httpx2.AsyncClient) -> Document:
    response = await client.get("/v1/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"] == "3.1.0"
    return Document(spec)


def strict(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy whose object schemas allow no properties they do not name."""
    spec = copy.deepcopy(spec)

    def tighten(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("type") == "object":
                node["additionalProperties"] = False
            for value in node.values():
                tighten(value)
        elif isinstance(node, list):
            for value in node:
                tighten(value)

    tighten(spec["components"]["schemas"])
    return spec


async def test_every_route_is_documented_and_nothing_else(service):
    app, client = await service()
    spec = (await fetch_document(client)).spec
    routes = operations_of(build_asgi_app(app).routes)
    # The dashboard's pages are for browsers, not API clients: the one rule left out.
    pages = operations_of(Dashboard(app, OpenStreams(), None, LoginThrottle()).pages())
    assert pages == {("GET", "/"), ("GET", "/static/{name}"), ("GET", "/login"),
                     ("POST", "/login"), ("POST", "/logout")}
    documented = {(method.upper(), path) for path, operations in spec["paths"].items()
                  for method in operations}
    assert documented == routes - pages
    assert ("GET", "/v1/events") in documented
    assert ("GET", "/metrics") in documented and ("GET", "/v1/openapi.json") in documented


def test_a_route_without_a_description_is_an_error():
    with pytest.raises(LookupError, match="DELETE"):
        document({*OPERATIONS, ("DELETE", "/v1/jobs/{id}")})
    with pytest.raises(LookupError, match="do not exist"):
        document(set(OPERATIONS) - {("GET", "/v1/status")})


async def test_the_document_needs_the_token_like_the_api(service):
    _, client = await service(token=TOKEN)
    assert (await client.get("/v1/openapi.json", headers={"Authorization": ""})).status_code \
        == 401
    await fetch_document(client)


async def test_real_events_conform_and_have_no_undocumented_fields(service):
    app, client = await service()
    doc = await fetch_document(client)
    strict_doc = Document(strict(doc.spec))
    job = (await client.post("/v1/jobs", json={"target": "quick"})).json()
    batch = (await client.post("/v1/batches", json={"targets": ["quick", "count"]})).json()
    finished = [await final_state(app, job["id"]), await final_state(app, batch["id"])]
    running = (await client.post("/v1/jobs", json={"target": "slow"})).json()
    events = [job, batch, *(json.loads(e.to_json()) for e in finished), running]
    for event in events:
        strict_doc.validate(event, EVENT)
    fields = {key for event in events for key in event}
    assert {"progress", "batchDetails", "jobDetails", "finishedAt"} <= fields


# (method, path, body: JSON-able, or bytes sent as is, expected status)
REQUESTS: list[tuple[str, str, Any, int]] = [
    ("GET", "/healthz", None, 200),
    ("GET", "/metrics", None, 200),
    ("POST", "/v1/jobs", {"target": "quick"}, 201),
    ("POST", "/v1/jobs", {"target": "count", "args": ["3"]}, 201),
    ("POST", "/v1/batches", {"targets": ["quick", "count"], "name": "both"}, 201),
    ("GET", "/v1/jobs?status=completed,pending&limit=5", None, 200),
    ("GET", "/v1/batches", None, 200),
    ("GET", "/v1/jobs/j1", None, 200),
    ("GET", "/v1/batches/b1", None, 200),
    ("GET", "/v1/status", None, 200),
    ("GET", "/v1/status/j1", None, 200),
    ("GET", "/v1/status/b1?stream=false", None, 200),
    ("POST", "/v1/jobs", b"{not json", 400),
    ("POST", "/v1/jobs", {"target": 3}, 400),
    ("POST", "/v1/jobs", b'{"target": "' + b"x" * 70_000 + b'"}', 413),
    ("POST", "/v1/jobs", {"target": "nope"}, 404),
    ("POST", "/v1/jobs", {"target": "quick", "args": ["x"]}, 422),
    ("POST", "/v1/batches", {"targets": []}, 422),
    ("GET", "/v1/jobs/j999", None, 404),
    ("GET", "/v1/batches/j1", None, 404),
    ("GET", "/v1/status/nonsense", None, 404),
    ("GET", "/v1/status/j1?stream=maybe", None, 400),
    ("GET", "/v1/jobs?limit=0", None, 400),
    ("POST", "/v1/jobs/j999/cancel", None, 404),
    ("POST", "/v1/batches/b999/cancel", None, 404),
]


async def test_real_answers_conform_to_the_document(service):
    app, client = await service()
    doc = await fetch_document(client)
    for method, path, body, status in REQUESTS:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        response = await client.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        doc.check(response)
        if response.status_code == 201:
            await final_state(app, response.json()["id"])
    for subject in ("j1", "b1"):  # finished now: cancelling again is a 409
        doc.check(await client.post(f"/v1/{'jobs' if subject[0] == 'j' else 'batches'}/"
                                    f"{subject}/cancel"))
    running = (await client.post("/v1/jobs", json={"target": "slow"})).json()["id"]
    async with client.stream("GET", f"/v1/status/{running}?stream=true") as stream:
        async for line in stream.aiter_lines():
            doc.validate(json.loads(line), EVENT)
            break
    doc.check(stream)
    cancelled = await client.post(f"/v1/jobs/{running}/cancel")
    assert cancelled.status_code == 200
    doc.check(cancelled)


async def test_auth_and_shutdown_errors_conform_to_the_document(service):
    app, with_token = await service(token=TOKEN)
    doc = await fetch_document(with_token)
    unauthorized = await with_token.get("/v1/jobs", headers={"Authorization": "Bearer no"})
    assert unauthorized.status_code == 401
    doc.check(unauthorized)
    _, without = await service()
    forbidden = await without.get("/v1/jobs", headers={"Origin": "https://evil.example"})
    assert forbidden.status_code == 403
    doc.check(forbidden)
    await app.queue.stop(0)  # what App.stop does first: no new work from here on
    for response in (await with_token.post("/v1/jobs", json={"target": "quick"}),
                     await with_token.get("/healthz")):
        assert response.status_code == 503
        doc.check(response)


async def test_answers_while_the_store_is_locked_conform_to_the_document(service):
    """503 store_unavailable with Retry-After for new work, /healthz degraded, and the
    status list still answered, naming why (`degraded`): each as documented, no field more."""
    app, client = await service()
    doc = await fetch_document(client)
    strict_doc = Document(strict(doc.spec))
    running = (await client.post("/v1/jobs", json={"target": "slow"})).json()["id"]
    async with write_locked(app.config.store.path):
        refused = await client.post("/v1/jobs", json={"target": "quick"})  # after 5 s
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "10"
        strict_doc.check(refused)
        health = await client.get("/healthz")
        assert health.json()["status"] == "degraded"
        strict_doc.check(health)
        status = await client.get("/v1/status")
        assert status.status_code == 200
        assert status.json()["degraded"] == "store: locked"
        assert [event["id"] for event in status.json()["active"]] == [running]
        strict_doc.check(status)
