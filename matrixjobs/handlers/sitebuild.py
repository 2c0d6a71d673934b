"""Example handler: build a small static site from a folder of text pages.

The model for user handlers (see docs/handlers.md). Target configuration:

    [targets.site]
    handler = "sitebuild"
    params = { source = "site/pages", output = "site/public", title = "Our site" }

Every `*.md` / `*.txt` file under `source` becomes an HTML page under `output`
(a `# ` line becomes a heading, blank lines split paragraphs), followed by an
`index.html` linking them (`contents.html` if a source page is itself `index`).
Progress is one step per page plus the listing.
Relative paths are taken from the target's `cwd` (default: the config's folder).
"""

from __future__ import annotations

import asyncio
import html
from pathlib import Path
from typing import Any

from matrixjobs.errors import PermanentJobError
from matrixjobs.models import Job
from matrixjobs.progress.reporter import ProgressReporter

PAGE_SUFFIXES = (".md", ".txt")


class SiteBuildHandler:
    async def run(self, job: Job, progress: ProgressReporter) -> dict[str, Any]:
        params = job.data.get("params") or {}
        base = Path(job.data.get("cwd") or ".")
        try:
            source = base / params["source"]
            output = base / params["output"]
        except KeyError as exc:
            raise PermanentJobError(f"sitebuild needs params.{exc.args[0]}") from None
        title = str(params.get("title", "Site"))
        if not source.is_dir():
            raise PermanentJobError(f"sitebuild: source folder not found: {source}")
        pages = sorted(p for p in source.rglob("*") if p.suffix in PAGE_SUFFIXES)
        total = len(pages) + 1
        built = []
        for number, page in enumerate(pages):
            progress.report(number, total, f"rendering {page.relative_to(source)}")
            relative = page.relative_to(source).with_suffix(".html")
            # File I/O off the event loop: a large site must not stall other jobs' progress.
            await asyncio.to_thread(_build_page, page, output / relative, title)
            built.append(relative.as_posix())
        # A source page called index is the home page; the listing then goes beside it.
        listing = "contents.html" if "index.html" in built else "index.html"
        progress.report(len(pages), total, f"writing {listing}")
        await asyncio.to_thread(_write, output / listing, _index(built, title))
        progress.report(total, total, "done")
        return {"pages": len(built), "output": str(output)}


def _build_page(page: Path, destination: Path, site_title: str) -> None:
    _write(destination, _render(page, site_title))


def _render(page: Path, site_title: str) -> str:
    blocks = page.read_text(encoding="utf-8", errors="replace").split("\n\n")
    body = []
    for block in blocks:
        text = block.strip()
        if not text:
            continue
        if text.startswith("# "):
            body.append(f"<h1>{html.escape(text[2:].strip())}</h1>")
        else:
            body.append(f"<p>{html.escape(text)}</p>")
    return _document(f"{page.stem} · {site_title}", "\n".join(body))


def _index(pages: list[str], title: str) -> str:
    items = "\n".join(
        f'<li><a href="{html.escape(p)}">{html.escape(p.removesuffix(".html"))}</a></li>'
        for p in pages
    )
    return _document(title, f"<h1>{html.escape(title)}</h1>\n<ul>\n{items}\n</ul>")


def _document(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
