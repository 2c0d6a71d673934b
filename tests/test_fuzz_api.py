"""The API's POST endpoints under fuzzing, over a real socket (no OpenAPI document yet).

Generated requests to every POST endpoint: JSON bodies near and far from the right
shape, raw bytes, wrong content types, bodies over the 64 KiB limit, deep nesting,
lone surrogates, odd ids in the path. Every answer must be under 500, JSON, and
either a success or the documented `{"error": {"code", "message"}}`; a job or batch
is created only from a valid body (judged here from the config).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
from helpers import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.models import Job
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.handlers import HandlerRegistry

PATTERN = r"[a-z0-9._-]{1,20}"
TARGETS: dict[str, dict[str, Any]] = {
    "plain": {"handler": "done"},
    "pattern": {"handler": "done", "args_pattern": PATTERN},
}
MAX_ARGS, MAX_ARG_LENGTH, MAX_BATCH = 32, 256, 50
MAX_BODY = 64 * 1024
# "." as an id makes the path /v1/jobs/cancel, where only GET is routed.
ERROR_CODES = {"bad_json", "bad_body", "body_too_large", "not_found", "unknown_target",
               "bad_arguments", "bad_batch", "already_finished", "method_not_allowed"}


# -- generated requests -----------------------------------------------------------------------

ODD_CHARS = ["\u202e", "\u200b", "\x00", "\x7f", "\ud800", "\udfff", "'", '"', "\\", "é", "²",
             "\u0661", "🟩", "/", "%", "?", "#", "..", " "]
odd_text = st.lists(st.one_of(st.characters(), st.sampled_from(ODD_CHARS)),
                    max_size=16).map("".join)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text,
                   st.sampled_from([*TARGETS, 10**400, -0.0]))
json_value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(odd_text, inner, max_size=5)), max_leaves=20)
arg = st.one_of(st.from_regex(PATTERN, fullmatch=True), odd_text, scalar,
                st.sampled_from(["a" * 257, "b" * 70_000]))
target = st.one_of(st.sampled_from(list(TARGETS)), odd_text, scalar)
job_body = st.fixed_dictionaries(
    {"target": target},
    optional={"args": st.one_of(st.lists(arg, max_size=MAX_ARGS + 2), scalar),
              "extra": json_value})
batch_body = st.fixed_dictionaries(
    {"targets": st.one_of(st.lists(target, max_size=MAX_BATCH + 2), scalar)},
    optional={"name": st.one_of(odd_text, scalar, st.just("n" * 201)), "extra": json_value})
to_json = st.builds(lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(
    "utf-8", "surrogatepass"), st.one_of(job_body, batch_body, json_value), st.booleans())
nested = st.builds(lambda opener, depth: (opener * depth).encode(),
                   st.sampled_from(["[", '{"a":', '{"target":[']),
                   st.sampled_from([10, 1_000, 5_000, 30_000]))
huge = st.one_of(
    st.builds(lambda size: b'{"target": "' + b"x" * size + b'"}',
              st.sampled_from([MAX_BODY - 20, MAX_BODY, 4 * MAX_BODY])),
    # Many wrong items, or a long unknown key: each one a validation error to describe.
    st.builds(lambda item, count: b'{"targets": [' + b",".join([item] * count) + b"]}",
              st.sampled_from([b"1", b"null", b'"plain"', b"[]"]),
              st.sampled_from([60, 1_000, 10_000])),
    st.builds(lambda key: b'{"' + key + b'": 1, "target": "plain"}',
              st.sampled_from([b"k" * 300, b"\\u202e" * 5_000, b"k" * 60_000])))
bodies = st.one_of(to_json, to_json, st.binary(max_size=64), nested, huge,
                   st.sampled_from([b"", b"null", b"NaN", b'{"target": "plain"', b"\xff\xfe",
                                    b'{"target": "\\ud800"}', b'{"targets": ["plain"], '
                                    b'"name": "\\udc00"}', b"[" * 100_000]))
content_types = st.sampled_from([None, "application/json", "text/plain", "application/x-www-"
                                 "form-urlencoded", "multipart/form-data; boundary=x",
                                 "application/json; charset=latin-1"])
ids = st.one_of(st.builds("{}{}".format, st.sampled_from("jbJBx"),
                          st.one_of(st.integers(0, 50), st.integers(2**62, 2**70))),
                odd_text.filter(bool), st.sampled_from(["j²", "j\u0661", "j" + "9" * 5000]))
paths = st.one_of(st.sampled_from(["/v1/jobs", "/v1/batches"]),
                  st.builds("/v1/{}/{}/cancel".format, st.sampled_from(["jobs", "batches"]),
                            ids.map(lambda text: quote(text, safe="", errors="surrogatepass"))))


# -- the service ------------------------------------------------------------------------------


class Done:
    async def run(self, job: Job, progress: ProgressReporter) -> None:
        progress.report(1, 1)


@dataclass
class Api:
    loop: asyncio.AbstractEventLoop
    app: App
    client: httpx2.AsyncClient

    def post(self, path: str, body: bytes, content_type: str | None) -> httpx2.Response:
        headers = {"Content-Type": content_type} if content_type else {}
        return self.loop.run_until_complete(self.client.post(path, content=body, headers=headers))

    def newest_job(self) -> int:
        jobs = self.loop.run_until_complete(self.app.jobs(limit=1))
        return int(jobs[0].id[1:]) if jobs else 0


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    config = make_config(tmp_path, targets=TARGETS, store={"synchronous": "normal"},
                         mcp={"enabled": False})
    handlers = HandlerRegistry()
    handlers.register("done", Done())
    loop = asyncio.new_event_loop()
    app = App(config, handlers)
    server = ApiServer(app, config.api, None)
    app.components.append(server)
    loop.run_until_complete(app.start())
    client = httpx2.AsyncClient(base_url=server.url, timeout=30.0)
    try:
        yield Api(loop, app, client)
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(app.stop())
        loop.close()


# -- what must hold ---------------------------------------------------------------------------


def valid_job(body: Any) -> bool:
    if not isinstance(body, dict) or set(body) - {"target", "args"} or "target" not in body:
        return False
    args = body.get("args", [])
    if body["target"] not in TARGETS or not isinstance(args, list):
        return False
    if not args:
        return True
    pattern = TARGETS[body["target"]].get("args_pattern")
    return pattern is not None and len(args) <= MAX_ARGS and all(
        isinstance(a, str) and len(a) <= MAX_ARG_LENGTH and re.fullmatch(pattern, a)
        for a in args)


def parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def check(api: Api, path: str, body: bytes, content_type: str | None) -> None:
    before = api.newest_job()
    response = api.post(path, body, content_type)
    new_jobs = api.newest_job() - before

    assert response.status_code < 500, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    if response.status_code >= 400:
        assert list(answer) == ["error"] and sorted(answer["error"]) == ["code", "message"]
        error = answer["error"]
        assert error["code"] in ERROR_CODES, error
        assert isinstance(error["message"], str) and error["message"]
        assert len(error["message"]) < 1000, error["message"][:1000]
        assert new_jobs == 0
    elif path == "/v1/jobs":
        assert response.status_code == 201 and new_jobs == 1
        assert len(body) <= MAX_BODY and valid_job(parsed(body)), body[:300]
    elif path == "/v1/batches":
        assert response.status_code == 201 and new_jobs >= 1
        assert len(body) <= MAX_BODY
    else:
        assert response.status_code == 200 and new_jobs == 0
        assert answer["status"] in ("cancelled", "completed", "failed")


@pytest.mark.slow
@pytest.mark.timeout(600)  # half a minute alone; more on a busy machine
def test_generated_posts_get_a_documented_answer(api):
    @settings(max_examples=3_000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(path=paths, body=bodies, content_type=content_types)
    def one_request(path: str, body: bytes, content_type: str | None) -> None:
        check(api, path, body, content_type)

    one_request()


# -- the defects the fuzzing found, one by one ------------------------------------------------


def error_of(response: httpx2.Response) -> dict[str, str]:
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


@pytest.mark.parametrize("opener", ["[", '{"target": {"a": '])
def test_a_deeply_nested_body_is_bad_json(api, opener):
    response = api.post("/v1/jobs", (opener * 3_000).encode(), "application/json")
    assert response.status_code == 400
    assert error_of(response) == {"code": "bad_json",
                                  "message": "request body is nested too deeply"}


@pytest.mark.parametrize("subject", ["j²", "j99999999999999999999", "j" + "9" * 5000])
def test_ids_that_are_not_ours_are_not_found_in_short(api, subject):
    response = api.post(f"/v1/jobs/{quote(subject)}/cancel", b"", None)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    assert len(error_of(response)["message"]) < 100


def test_thousands_of_wrong_items_are_described_in_short(api):
    response = api.post("/v1/batches", b'{"targets": [' + b",".join([b"1"] * 10_000) + b"]}",
                        None)
    assert response.status_code == 400
    assert error_of(response) == {"code": "bad_body", "message": (
        "targets.0: Input should be a valid string; targets.1: Input should be a valid "
        "string; targets.2: Input should be a valid string; and 9997 more")}


def test_a_long_unknown_field_is_named_in_short(api):
    response = api.post("/v1/jobs", b'{"' + b"k" * 60_000 + b'": 1, "target": "plain"}', None)
    assert response.status_code == 400
    assert error_of(response) == {"code": "bad_body",
                                  "message": f"{'k' * 40}…: unknown field"}
