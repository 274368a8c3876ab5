"""A job's record in the store: its file, its executor and each unit's state (pending, running,
done, skipped, failed) with where it ran, how many attempts it took and why it failed, so
`workbench jobs` and the dashboard can follow a job started from the CLI or the Launch page, local
or on Ray. Only the job's driver writes the record; it is replaced atomically, at most a few times
a second, so readers on other processes always see a whole record."""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Callable

from workbench.atomic import pid_alive

UNIT_STATES = ("pending", "running", "done", "skipped", "failed")
SAVE_EVERY_S = 0.5


class JobRecord:
    """The driver's handle on one job's record."""

    def __init__(self, store, data: dict[str, Any]):
        self.store = store
        self.data = data
        self._saved_at = 0.0
        self._dirty = False
        self.listener: Callable[[dict[str, Any]], None] | None = None  # told of every change (a progress display)

    @classmethod
    def start(cls, store, specs, source: str, text: str, executor: str, address: str | None = None) -> "JobRecord":
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        units = [{"label": s.label(), "spec": s.to_json(), "state": "pending", "run_id": None, "node": None,
                  "pid": None, "attempts": 0, "message": None, "user_error": None, "traceback": None, "progress": None,
                  "loaded_model": False, "started": None, "finished": None}
                 for s in specs]
        record = cls(store, {"job_id": job_id, "file": source, "text": text, "executor": executor, "address": address,
                             "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "finished": None,
                             "state": "running", "units": units})
        record.save()
        return record

    @property
    def job_id(self) -> str:
        return self.data["job_id"]

    def update(self, index: int, **fields: Any) -> None:
        """Change one unit's fields; saved now when its state changes, else within SAVE_EVERY_S."""
        unit = self.data["units"][index]
        changed_state = fields.get("state", unit["state"]) != unit["state"]
        unit.update(fields)
        self._dirty = True
        self.save(force=changed_state)
        if self.listener is not None:
            self.listener(self.data)

    def save(self, force: bool = True) -> None:
        if force or (self._dirty and time.monotonic() - self._saved_at >= SAVE_EVERY_S):
            self.store.write_job_record(self.job_id, self.data)
            self._saved_at, self._dirty = time.monotonic(), False

    def finish(self) -> None:
        self.data["finished"] = time.time()
        self.data["state"] = "failed" if any(u["state"] == "failed" for u in self.data["units"]) else "done"
        self.save()


    def abort(self, error: BaseException) -> None:
        """The driver stops before the job ends (Ctrl-C, a failure outside any unit): say so."""
        self.data["finished"] = time.time()
        self.data["state"] = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self.data["message"] = str(error) or type(error).__name__
        self.save()


def job_state(record: dict[str, Any]) -> str:
    """running, done, failed, or interrupted (stopped, or its driver on this host is gone before it finished)."""
    state = record["state"]
    if state == "running" and record.get("host") == socket.gethostname() and not pid_alive(int(record["pid"])):
        return "interrupted"
    return state


def counts(record: dict[str, Any]) -> dict[str, int]:
    """Units per state, every state present."""
    out = dict.fromkeys(UNIT_STATES, 0)
    for unit in record["units"]:
        out[unit["state"]] += 1
    return out
