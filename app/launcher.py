"""Starting runs in the background from the dashboard: a form becomes a job file under
`<store>/jobs/`, validated like any job file, then run by a detached `workbench run` process whose
output goes to a log next to it. Plain functions, so tests and scripts can use them too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.jobs import parse_job
from workbench.store import Store

WORKBENCH = str(Path(sys.executable).parent / "workbench")


def job_text(model: str, task: str, task_params: str, method: str, params: str) -> str:
    return (f"[[run]]\nmodel = {json.dumps(model)}\ntask = {json.dumps(task)}\nmethod = {json.dumps(method)}\n"
            f"[run.task_params]\n{task_params.strip()}\n[run.params]\n{params.strip()}\n")


def validate(text: str) -> None:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise WorkbenchError(f"the parameters are not valid TOML ({e}); write them as `name = value` lines") from None
    parse_job(doc, source="the form")


def launch(store: Store, text: str) -> Path:
    root = store.root
    job = store.write_job(time.strftime("%Y%m%d-%H%M%S") + ".toml", text)
    stem = job.with_suffix("")
    log = stem.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", '"$0" run "$1" --store "$2"; echo "[exit $?]"', WORKBENCH, str(job), str(root)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "COLUMNS": "100"})
    stem.with_suffix(".pid").write_text(str(proc.pid))
    return job


def job_status(job: Path) -> tuple[str, str]:
    """(status, last line of its log): done / failed / running / interrupted."""
    log = job.with_suffix(".log")
    lines = [ln for ln in (log.read_text(errors="replace").replace("\r", "\n").splitlines() if log.exists() else []) if ln.strip()]
    last = lines[-1] if lines else ""
    if last.startswith("[exit "):
        return ("done" if last == "[exit 0]" else "failed"), (lines[-2] if len(lines) > 1 else "")
    pid_file = job.with_suffix(".pid")
    alive = pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
    return ("running" if alive else "interrupted"), last
