"""User handlers: loading by config or entry point, and the shipped sitebuild example."""

from __future__ import annotations

import pytest
from helpers import final_state, make_config

from matrixjobs.app import App
from matrixjobs.errors import ConfigError
from matrixjobs.models import Status


async def test_handler_named_in_config_runs_with_target_params(tmp_path, running_app):
    config = make_config(
        tmp_path,
        handlers={"greet": "handler_plugins:Greeter"},
        targets={"hi": {"handler": "greet", "params": {"who": "team"}}},
    )
    app = await running_app(config)
    job = await app.submit("hi")
    assert job.type == "greet"
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED and final.message == "greeted"
    assert (await app.store.get_job(job.id)).result == {"greeting": "hello team"}


@pytest.mark.parametrize(
    ("handlers", "handler", "message"),
    [
        ({}, "nope", "targets.t.handler: unknown handler 'nope'"),
        ({"x": "no_such_module:X"}, "x", "handlers.x: cannot import 'no_such_module:X'"),
        ({"x": "handler_plugins:Missing"}, "x", "handlers.x: cannot import"),
        ({"x": "handler_plugins:NotAHandler"}, "x", "no async run(job, progress) method"),
        ({"x": "handler_plugins:ExplodesOnCreate"}, "x", "no database configured"),
    ],
)
def test_bad_handler_configuration_is_refused_at_start_up(tmp_path, handlers, handler, message):
    config = make_config(tmp_path, handlers=handlers, targets={"t": {"handler": handler}})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        App(config)


async def test_sitebuild_entry_point_builds_a_real_site(tmp_path, running_app):
    source = tmp_path / "pages"
    (source / "guide").mkdir(parents=True)
    (source / "index.md").write_text("# Home\n\nWelcome <friends>.\n")
    (source / "guide" / "start.txt").write_text("# Start\n\nStep one.\n\nStep two.\n")
    config = make_config(tmp_path, targets={
        "site": {"handler": "sitebuild", "cwd": str(tmp_path),
                 "params": {"source": "pages", "output": "public", "title": "Docs"}},
    })
    app = await running_app(config)
    job = await app.submit("site")
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    assert final.progress.current == final.progress.total == 3
    page = (tmp_path / "public" / "index.html").read_text()
    assert "<h1>Home</h1>" in page and "Welcome &lt;friends&gt;." in page
    contents = (tmp_path / "public" / "contents.html").read_text()
    assert '<a href="guide/start.html">' in contents and '<a href="index.html">' in contents
    guide = (tmp_path / "public" / "guide" / "start.html").read_text()
    assert "<p>Step two.</p>" in guide


async def test_sitebuild_with_missing_source_fails_without_retrying(tmp_path, running_app):
    config = make_config(tmp_path, targets={
        "site": {"handler": "sitebuild", "max_retries": 3,
                 "params": {"source": "nowhere", "output": "public"}},
    })
    app = await running_app(config)
    final = await final_state(app, (await app.submit("site")).id)
    assert final.status == Status.FAILED
    assert "source folder not found" in final.error
    assert final.job_details.retry_count == 0
