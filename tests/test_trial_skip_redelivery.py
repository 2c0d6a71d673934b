"""A repeat of a delivery (a forge's Redeliver) or of a schedule's slot (a second node
reaching it) for a target whose concurrency group skips when busy: the group is busy with
the very job the first one started, so the repeat must answer with that job, as every
repeat does, not "busy: j41 is running; not started" (the forge shows a failed delivery;
the second node logs a warning that the run was not started, though it was)."""

from __future__ import annotations

import pytest
from conftest import on_backend
from helpers import make_config, python_target

from matrixjobs.errors import AlreadySubmittedError, GroupBusyError
from matrixjobs.models import Trigger, TriggerKind

SLOW = python_target("import time; time.sleep(30)", concurrency="deploy", on_busy="skip")
PUSH = Trigger(TriggerKind.WEBHOOK, "site", event="push", ref="refs/heads/main",
               branch="main", sha="3f2c1ab9d0e4c5b6a7f8e9d0c1b2a3f4e5d6c7b8")


async def test_a_repeated_delivery_to_a_busy_skip_group_answers_with_its_first_job(
        tmp_path, database_url, running_app):
    app = await running_app(on_backend(make_config(tmp_path, targets={"deploy": SLOW}),
                                       database_url))
    first = await app.trigger(PUSH, target="deploy", dedupe_key="webhook:site:d1")
    with pytest.raises(AlreadySubmittedError) as again:
        await app.trigger(PUSH, target="deploy", dedupe_key="webhook:site:d1")
    assert again.value.subject_id == first.id
    # Another delivery (another key) is still refused while the group is busy.
    with pytest.raises(GroupBusyError, match=f"deploy is busy: {first.id}"):
        await app.trigger(PUSH, target="deploy", dedupe_key="webhook:site:d2")
    with pytest.raises(AlreadySubmittedError) as batch_again:
        await app.trigger(PUSH, batch=["deploy"], dedupe_key="webhook:site:d1")
    assert batch_again.value.subject_id == first.id
