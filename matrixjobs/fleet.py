"""The fleet as every view shows it: one worker's state (JSON in camelCase), from its row.

The API answers it, the CLI and MCP read it back, the room words it; `alive` and
`silentFor` are decided once, here, by the server's clock and `[queue] lease_s`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from matrixjobs.models import Worker
from matrixjobs.progress.events import CamelModel


class WorkerState(CamelModel):
    id: str
    name: str
    host: str
    pid: int
    role: str
    labels: list[str]
    slots: int
    version: str
    running: list[str]
    started_at: datetime
    heartbeat_at: datetime
    alive: bool
    # Seconds since its last heartbeat once it went silent; null while alive.
    silent_for: float | None = None

    def to_json(self) -> str:
        # Unlike events, the null of a live worker's silentFor is part of the answer.
        return self.model_dump_json(by_alias=True)


def worker_state(worker: Worker, now: float, lease_s: float) -> WorkerState:
    alive = worker.alive(now, lease_s)
    return WorkerState(
        id=worker.id, name=worker.name, host=worker.host, pid=worker.pid, role=worker.role,
        labels=worker.labels, slots=worker.slots, version=worker.version,
        running=worker.running, started_at=datetime.fromtimestamp(worker.started_at, UTC),
        heartbeat_at=datetime.fromtimestamp(worker.heartbeat_at, UTC), alive=alive,
        silent_for=None if alive else round(now - worker.heartbeat_at, 1),
    )
