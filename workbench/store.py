"""The results store: the caching layer every entry point shares.

Layout of a store directory:

    runs/<k[:2]>/<key>/   meta.json, scores.parquet, tensors.safetensors   (one complete result)
    catalog.sqlite        an index of runs for listing and filtering (status, params, timings)
    tmp/<pid>-<uuid>/     results being written; renamed into runs/ when complete
    locks/<key>.lock      per-key locks so concurrent writers of one key compute it once

Why this shape: a result directory is written completely in `tmp/` and then renamed into
place, and a rename is atomic, so a reader sees either nothing or the whole result, whatever
instant a writer is killed at. The SQLite catalog (WAL mode) is safe with several processes;
it is only an index: `runs/` is the truth and the catalog is reconciled from it on listing.
Keys are sha256 of the canonical JSON of everything that produced a result, never user strings.
Formats are Parquet, safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from filelock import FileLock

from workbench.errors import WorkbenchError
from workbench.paths import workbench_home
from workbench.result import Result

RUN_ID_LEN = 16
CATALOG_COLUMNS = ["run_id", "model", "task", "task_params", "method", "params", "status", "created", "duration_s",
                   "size_bytes", "error"]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_key(spec: dict[str, Any]) -> str:
    """Stable across processes and machines: sha256 of the spec's canonical JSON."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A directory of results. Creating a `Store` writes nothing; the first result does."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else workbench_home()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- paths -------------------------------------------------------------------------------
    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / key[:2] / key

    @property
    def _catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    def _ensure(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise WorkbenchError(f"store path {self.root} is a file, not a directory; choose another --store")
        for sub in ("runs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS runs (key TEXT PRIMARY KEY, run_id TEXT, model TEXT, task TEXT, task_params TEXT,"
                " method TEXT, params TEXT, status TEXT, created REAL, duration_s REAL, size_bytes INTEGER, error TEXT,"
                " pid INTEGER)"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._catalog_path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    # -- reading -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return (self.run_dir(key) / "meta.json").is_file()

    def resolve(self, run_id: str) -> str:
        """The full key of a run id or unique key prefix."""
        if len(run_id) < 4 or not all(c in "0123456789abcdef" for c in run_id):
            raise WorkbenchError(f"'{run_id}' is not a run id (hex, at least 4 characters); `workbench ls` lists them")
        shard = self.root / "runs" / run_id[:2]
        matches = [p.name for p in shard.iterdir() if p.name.startswith(run_id)] if shard.is_dir() else []
        if not matches:
            raise WorkbenchError(f"no run '{run_id}' in store {self.root}; `workbench ls --store {self.root}` lists the runs")
        if len(matches) > 1:
            raise WorkbenchError(f"run id '{run_id}' is ambiguous ({len(matches)} runs); give more characters")
        return matches[0]

    def get(self, run_id_or_key: str) -> Result:
        """Load a stored result (by run id, key prefix or full key)."""
        from safetensors.torch import load_file

        key = run_id_or_key if len(run_id_or_key) == 64 and self.has(run_id_or_key) else self.resolve(run_id_or_key)
        d = self.run_dir(key)
        try:
            meta = json.loads((d / "meta.json").read_text())
            scores = pd.read_parquet(d / "scores.parquet")
            tensors = load_file(str(d / "tensors.safetensors")) if (d / "tensors.safetensors").is_file() else {}
        except Exception as e:  # any unreadable file means the entry is damaged
            raise WorkbenchError(
                f"store entry {key[:RUN_ID_LEN]} is corrupted ({type(e).__name__}: {e}); "
                f"delete it with `workbench rm {key[:RUN_ID_LEN]} --store {self.root}` and run it again"
            ) from e
        return Result(scores, tensors, meta)

    # -- writing -----------------------------------------------------------------------------
    def put(self, spec: dict[str, Any], result: Result, duration_s: float | None = None) -> str:
        """Store `result` under the key of `spec`, atomically; returns the key.

        If the key is already stored (another writer won a race) the stored result stands.
        """
        from safetensors.torch import save_file

        self._ensure()
        key = content_key(spec)
        tmp = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            meta = {
                **result.meta,
                "key": key,
                "run_id": key[:RUN_ID_LEN],
                "spec": spec,
                "created": time.time(),
                "duration_s": duration_s,
                "tensor_dims": result.meta.get("tensor_dims", {}),
            }
            result.scores.to_parquet(tmp / "scores.parquet", index=False)
            if result.tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in result.tensors.items()}, str(tmp / "tensors.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            final = self.run_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.has(key):
                    raise
            else:
                _fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._index(key)
        result.meta.update(json.loads((self.run_dir(key) / "meta.json").read_text()))
        return key

    def _index(self, key: str) -> None:
        """Record a stored run in the catalog from its meta.json (idempotent)."""
        d = self.run_dir(key)
        meta = json.loads((d / "meta.json").read_text())
        spec = meta.get("spec", {})
        size = sum(f.stat().st_size for f in d.iterdir())
        row = (
            key, key[:RUN_ID_LEN], spec.get("model", {}).get("name"), spec.get("task", {}).get("name"),
            json.dumps(spec.get("task", {}).get("params", {}), sort_keys=True),
            spec.get("method"), json.dumps(spec.get("params", {}), sort_keys=True), "done",
            meta.get("created"), meta.get("duration_s"), size, None, None,
        )
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)

    def _mark(self, key: str, spec: dict[str, Any], status: str, error: str | None = None) -> None:
        self._ensure()
        row = (
            key, key[:RUN_ID_LEN], spec["model"]["name"], spec["task"]["name"],
            json.dumps(spec["task"].get("params", {}), sort_keys=True), spec["method"],
            json.dumps(spec.get("params", {}), sort_keys=True), status, time.time(), None, None, error, os.getpid(),
        )
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)

    def _unmark(self, key: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM runs WHERE key = ? AND status != 'done'", (key,))

    def get_or_compute(self, spec: dict[str, Any], compute: Callable[[], Result]) -> Result:
        """The stored result for `spec`, or compute, store and return it.

        Concurrent callers with the same spec wait on a per-key lock, so it is computed once.
        A user error (WorkbenchError) inside `compute` leaves the store as it was; any other
        failure is recorded in the catalog as `failed` with its message.
        """
        key = content_key(spec)
        if self.has(key):
            return self._cached(key)
        self._ensure()
        with FileLock(str(self.root / "locks" / f"{key}.lock")):
            if self.has(key):
                return self._cached(key)
            self._mark(key, spec, "running")
            start = time.perf_counter()
            try:
                result = compute()
            except WorkbenchError:
                self._unmark(key)
                raise
            except BaseException as e:
                self._mark(key, spec, "failed", f"{type(e).__name__}: {e}")
                raise
            self.put(spec, result, duration_s=time.perf_counter() - start)
            result.meta["cached"] = False
            return result

    def _cached(self, key: str) -> Result:
        result = self.get(key)
        result.meta["cached"] = True
        return result

    def delete(self, run_id: str) -> str:
        """Remove a run (atomically: renamed away first, then deleted)."""
        key = self.resolve(run_id)
        trash = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}-deleted"
        os.rename(self.run_dir(key), trash)
        shutil.rmtree(trash, ignore_errors=True)
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM runs WHERE key = ?", (key,))
        return key

    # -- the catalog -------------------------------------------------------------------------
    def catalog(self, **filters: str) -> pd.DataFrame:
        """All runs (done, running, failed, interrupted), newest first; filter on any column by equality
        (`params` and `task_params` by substring)."""
        if not (self.root / "runs").is_dir():
            return pd.DataFrame(columns=CATALOG_COLUMNS)
        self._ensure()
        self._reconcile()
        with closing(self._connect()) as db:
            frame = pd.read_sql_query("SELECT * FROM runs ORDER BY created DESC", db)
        dead = (frame["status"] == "running") & ~frame["pid"].map(lambda p: pd.notna(p) and _pid_alive(int(p)))
        frame.loc[dead, "status"] = "interrupted"
        for col, value in filters.items():
            if value is None:
                continue
            if col not in CATALOG_COLUMNS:
                raise WorkbenchError(f"cannot filter runs on '{col}'; filter on one of {CATALOG_COLUMNS}")
            substring = col in ("params", "task_params")
            frame = frame[frame[col].astype(str).str.contains(value, regex=False)] if substring else frame[frame[col] == value]
        return frame[CATALOG_COLUMNS].reset_index(drop=True)

    def _reconcile(self) -> None:
        """Index runs present on disk but missing from the catalog (a writer killed between the
        rename and the catalog insert), and drop catalog rows whose run is gone."""
        on_disk = {p.name for shard in (self.root / "runs").iterdir() if shard.is_dir() for p in shard.iterdir()}
        with closing(self._connect()) as db:
            done = {k for (k,) in db.execute("SELECT key FROM runs WHERE status = 'done'")}
        for key in on_disk - done:
            if self.has(key):
                self._index(key)
        gone = done - on_disk
        if gone:
            with closing(self._connect()) as db, db:
                db.executemany("DELETE FROM runs WHERE key = ?", [(k,) for k in gone])

    def clean_tmp(self) -> int:
        """Delete staging directories left by writers that died; returns how many."""
        tmp = self.root / "tmp"
        removed = 0
        for entry in tmp.iterdir() if tmp.is_dir() else []:
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
