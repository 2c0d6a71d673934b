"""The demo's sample targets: `python -m matrixjobs.demo.jobs NAME`.

Each one prints a few ordinary output lines and `::progress N/M step` lines
with pauses in between, like a real build would, so the bot has something to
show. They live in the package (not examples/) so the demo also works from a
plain `pip install "matrixjobs[demo]"`. `lint` always fails, to show ❌ and the
output tail.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    text: str
    seconds: float
    output: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DemoJob:
    description: str
    steps: tuple[Step, ...]
    exit_code: int = 0


JOBS: dict[str, DemoJob] = {
    "docs": DemoJob("Build the documentation (~8 s)", (
        Step("collecting pages", 0.8, ("found 42 pages in docs/",)),
        Step("parsing markdown", 1.5),
        Step("rendering API reference", 2.0, ("api: 118 functions, 23 classes",)),
        Step("building search index", 1.2),
        Step("writing HTML", 1.5, ("wrote 42 pages to build/html",)),
        Step("checking links", 1.0, ("0 broken links",)),
    )),
    "api": DemoJob("Build and test the API server (~7 s)", (
        Step("resolving dependencies", 1.0),
        Step("compiling", 2.0, ("compiled 57 modules",)),
        Step("running unit tests", 2.5, ("312 passed in 2.4s",)),
        Step("packaging", 1.5, ("built dist/api-2.4.1.tar.gz",)),
    )),
    "site": DemoJob("Render the website (~9 s)", (
        Step("loading templates", 1.0),
        Step("rendering pages", 3.0, ("rendered 128 pages",)),
        Step("optimizing images", 3.0, ("saved 3.1 MB on 64 images",)),
        Step("writing sitemap", 1.0),
        Step("publishing to staging", 1.0, ("https://staging.example.org is up to date",)),
    )),
    "lint": DemoJob("Run the linters (fails on purpose, ~4 s)", (
        Step("checking formatting", 1.5, ("412 files already formatted",)),
        Step("checking imports", 1.5, (
            "src/app/server.py:12:1: F401 'os' imported but unused",
            "src/app/routes.py:88:5: F841 local variable 'user' is assigned to but never used",
        )),
        Step("checking types", 1.0, (
            "src/app/models.py:40: error: Argument 1 to \"load\" has incompatible type "
            "\"str\"; expected \"Path\"",
            "Found 3 problems (2 lint, 1 type).",
        )),
    ), exit_code=1),
}


def run(job: DemoJob) -> int:
    total = len(job.steps)
    for number, step in enumerate(job.steps, start=1):
        print(f"::progress {number - 1}/{total} {step.text}", flush=True)
        time.sleep(step.seconds)
        for line in step.output:
            print(line, flush=True)
    if job.exit_code == 0:
        print(f"::progress {total}/{total} done", flush=True)
    return job.exit_code


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in JOBS:
        print(f"usage: python -m matrixjobs.demo.jobs {{{','.join(JOBS)}}}", file=sys.stderr)
        return 2
    return run(JOBS[argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
