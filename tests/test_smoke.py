from helpers import final_state, make_config, python_target

from matrixjobs.models import Status


async def test_command_target_runs_to_completion_with_progress(tmp_path, running_app):
    code = """
        for i in range(3):
            print(f"::progress {i + 1}/3 step {i + 1}")
    """
    app = await running_app(make_config(tmp_path, targets={"count": python_target(code)}))
    job = await app.submit("count")
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    assert final.progress is not None and final.progress.percentage == 100.0
    assert final.message == "step 3"
