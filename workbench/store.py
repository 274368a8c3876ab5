"""The results store: the only way results, tensors, activation caches, checkpoints and job files
go in or out.

Layout of a store directory (format 2, recorded in `store.json`):

    runs/<k[:2]>/<key>/          meta.json, scores.parquet, tensors.safetensors   (one complete result)
    activations/<k[:2]>/<key>/   an activation cache: meta.json + safetensors shards
    checkpoints/<key>/step_N/    working state of a run still being computed (resumable)
    jobs/                        job records (<job id>.json); job files started from the dashboard, with their logs
    catalog.sqlite               an index of runs for listing and filtering (status, params, timings)
    tmp/<pid>-<hex>/             entries being written; renamed into place when complete
    locks/<name>.lock            per-key locks so concurrent writers of one key compute it once

Every directory entry is written by `workbench.atomic.atomic_dir`, so a reader sees nothing or
the whole entry. The SQLite catalog (WAL mode) is only an index: `runs/` is the truth, the catalog
is reconciled from it on listing and rebuilt from it when damaged. Keys are sha256 of the
canonical JSON of everything that produced a result, never user strings. Formats are Parquet,
safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from workbench.atomic import atomic_dir, pid_alive, staging_name, write_file_atomic, writer_pid
from workbench.errors import WorkbenchError
from workbench.paths import workbench_home

if TYPE_CHECKING:
    import pandas as pd

    from workbench.result import Result

FORMAT = 2
RUN_ID_LEN = 16
CATALOG_COLUMNS = ["run_id", "model", "task", "task_params", "method", "params", "status", "created", "duration_s",
                   "size_bytes", "error"]
_TABLE = ("CREATE TABLE IF NOT EXISTS runs (key TEXT PRIMARY KEY, run_id TEXT, model TEXT, task TEXT, task_params TEXT,"
          " method TEXT, params TEXT, status TEXT, created REAL, duration_s REAL, size_bytes INTEGER, error TEXT, pid INTEGER)")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_key(spec: dict[str, Any]) -> str:
    """Stable across processes and machines: sha256 of the spec's canonical JSON."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


class Store:
    """A directory of results. Creating a `Store` writes nothing; the first result does."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else workbench_home()
        self._format_ok = False

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- format ------------------------------------------------------------------------------
    def _check_format(self) -> None:
        """Refuse a store written in another format (its keys and columns mean other things)."""
        if self._format_ok:
            return
        if self.root.exists() and not self.root.is_dir():
            raise WorkbenchError(f"store path {self.root} is a file, not a directory; choose another --store")
        marker = self.root / "store.json"
        if marker.is_file():
            try:
                found = json.loads(marker.read_text()).get("format")
            except (ValueError, AttributeError):
                found = "unreadable"
        else:
            found = 1 if (self.root / "runs").is_dir() else None
        if found is not None and found != FORMAT:
            raise WorkbenchError(
                f"store {self.root} has format {found}, written by another Workbench version; this one reads format "
                f"{FORMAT} (run keys and score columns changed). Recompute into a new store with --store, or move "
                f"this one aside (mv {self.root} {self.root}.v{found})"
            )
        self._format_ok = True

    def _ensure(self) -> None:
        self._check_format()
        # the format marker first: a concurrent writer that sees runs/ must also see store.json
        # (runs/ without it is how a format-1 store looks)
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "store.json").is_file():
            write_file_atomic(self.root / "store.json", json.dumps({"format": FORMAT}))
        for sub in ("runs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._query(lambda db: db.execute(_TABLE), write=True)

    # -- the catalog database ----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "catalog.sqlite", timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _query(self, fn: Callable[[sqlite3.Connection], Any], write: bool = False) -> Any:
        """Run `fn` on the catalog; a damaged catalog is set aside and rebuilt from `runs/` once."""
        for attempt in (0, 1):
            try:
                with closing(self._connect()) as db:
                    if write:
                        with db:
                            return fn(db)
                    return fn(db)
            except sqlite3.DatabaseError:
                if attempt:
                    raise WorkbenchError(f"the catalog of store {self.root} cannot be rebuilt; remove "
                                         f"{self.root / 'catalog.sqlite'} and list the runs again") from None
                self._rebuild_catalog()

    def _rebuild_catalog(self) -> None:
        aside = self.root / "tmp" / f"{staging_name()}-catalog-damaged"
        aside.mkdir(parents=True)
        for suffix in ("", "-wal", "-shm"):
            f = self.root / f"catalog.sqlite{suffix}"
            if f.exists():
                os.rename(f, aside / f.name)
        with closing(self._connect()) as db, db:
            db.execute(_TABLE)
        for key in self._keys_on_disk():
            self._index(key)

    # -- paths -------------------------------------------------------------------------------
    def _run_dir(self, key: str) -> Path:
        return self.root / "runs" / key[:2] / key

    def _keys_on_disk(self) -> set[str]:
        runs = self.root / "runs"
        return {p.name for shard in runs.iterdir() if shard.is_dir() for p in shard.iterdir()} if runs.is_dir() else set()

    # -- reading -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        self._check_format()
        return (self._run_dir(key) / "meta.json").is_file()

    def resolve(self, run_id: str) -> str:
        """The full key of a run id or unique key prefix."""
        self._check_format()
        if len(run_id) < 4 or not all(c in "0123456789abcdef" for c in run_id):
            raise WorkbenchError(f"'{run_id}' is not a run id (hex, at least 4 characters); `workbench ls` lists them")
        shard = self.root / "runs" / run_id[:2]
        matches = [p.name for p in shard.iterdir() if p.name.startswith(run_id)] if shard.is_dir() else []
        if not matches:
            raise WorkbenchError(f"no run '{run_id}' in store {self.root}; `workbench ls --store {self.root}` lists the runs")
        if len(matches) > 1:
            raise WorkbenchError(f"run id '{run_id}' is ambiguous ({len(matches)} runs); give more characters")
        return matches[0]

    def _key(self, run_id_or_key: str) -> str:
        return run_id_or_key if len(run_id_or_key) == 64 and self.has(run_id_or_key) else self.resolve(run_id_or_key)

    def _damaged(self, key: str, e: Exception) -> WorkbenchError:
        return WorkbenchError(
            f"store entry {key[:RUN_ID_LEN]} is corrupted ({type(e).__name__}: {e}); "
            f"delete it with `workbench rm {key[:RUN_ID_LEN]} --store {self.root}` and run it again"
        )

    def meta(self, run_id: str) -> dict[str, Any]:
        """A run's metadata alone (spec, timings, what the method added)."""
        key = self._key(run_id)
        try:
            return json.loads((self._run_dir(key) / "meta.json").read_text())
        except ValueError as e:
            raise self._damaged(key, e) from None

    def scores(self, run_id: str) -> "pd.DataFrame":
        """A run's score frame alone (no tensors read)."""
        import pandas as pd

        key = self._key(run_id)
        try:
            return pd.read_parquet(self._run_dir(key) / "scores.parquet")
        except Exception as e:  # any unreadable file means the entry is damaged
            raise self._damaged(key, e) from None

    def score_table(self, run_id: str):
        """A run's scores as a pyarrow Table (no pandas import: what the CLI's reads use)."""
        import pyarrow.parquet as pq

        key = self._key(run_id)
        try:
            return pq.ParquetFile(self._run_dir(key) / "scores.parquet").read()
        except Exception as e:
            raise self._damaged(key, e) from None

    def tensors(self, run_id: str, names: list[str] | None = None, framework: str = "pt") -> dict[str, Any]:
        """Some (or all) of a run's tensors, as torch (`pt`) or numpy (`np`) arrays."""
        from safetensors import safe_open

        key = self._key(run_id)
        path = self._run_dir(key) / "tensors.safetensors"
        if not path.is_file():
            return {}
        try:
            with safe_open(str(path), framework=framework) as f:
                present = set(f.keys())
                return {n: f.get_tensor(n) for n in (names if names is not None else sorted(present)) if n in present}
        except Exception as e:
            raise self._damaged(key, e) from None

    def get(self, run_id_or_key: str) -> "Result":
        """Load a stored result (by run id, key prefix or full key)."""
        from workbench.result import Result

        key = self._key(run_id_or_key)
        return Result(self.scores(key), self.tensors(key), self.meta(key))

    # -- writing -----------------------------------------------------------------------------
    def put(self, spec: dict[str, Any], result: "Result", duration_s: float | None = None) -> str:
        """Store `result` under the key of `spec`, atomically; returns the key.

        If the key is already stored (another writer won a race) the stored result stands.
        """
        from safetensors.torch import save_file

        self._ensure()
        key = content_key(spec)
        with atomic_dir(self._run_dir(key), self.root / "tmp") as tmp:
            meta = {**result.meta, "key": key, "run_id": key[:RUN_ID_LEN], "spec": spec, "created": time.time(),
                    "duration_s": duration_s, "tensor_dims": result.meta.get("tensor_dims", {})}
            result.scores.to_parquet(tmp / "scores.parquet", index=False)
            if result.tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in result.tensors.items()}, str(tmp / "tensors.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        self._index(key)
        result.meta.update(self.meta(key))
        return key

    ENTRY_FILES = ("meta.json", "scores.parquet", "tensors.safetensors")

    def entry_files(self, key: str) -> dict[str, bytes]:
        """A stored run's files as bytes: how a job worker ships a result to the driver's store."""
        d = self._run_dir(self._key(key))
        return {name: (d / name).read_bytes() for name in self.ENTRY_FILES if (d / name).is_file()}

    def put_files(self, files: dict[str, bytes]) -> str:
        """Store a run shipped as `entry_files` (atomically, indexed like `put`); returns its key.

        The key is recomputed from the spec inside meta.json, so a shipped entry lands where the
        local executor would have put it. If the key is already stored, the stored result stands."""
        unknown = set(files) - set(self.ENTRY_FILES)
        if unknown or "meta.json" not in files or "scores.parquet" not in files:
            raise ValueError(f"a shipped run has the files {sorted(files)}; expected meta.json, scores.parquet [, tensors]")
        meta = json.loads(files["meta.json"])
        key = content_key(meta["spec"])
        if meta.get("key") != key:
            raise ValueError(f"a shipped run's key {meta.get('key')} is not the hash of its spec ({key})")
        self._ensure()
        if not self.has(key):
            with atomic_dir(self._run_dir(key), self.root / "tmp") as tmp:
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
        self._index(key)
        return key

    def _index(self, key: str) -> None:
        """Record a stored run in the catalog from its meta.json (idempotent)."""
        d = self._run_dir(key)
        meta = json.loads((d / "meta.json").read_text())
        spec = meta.get("spec", {})
        row = (
            key, key[:RUN_ID_LEN], spec.get("model", {}).get("name"), spec.get("task", {}).get("name"),
            json.dumps(spec.get("task", {}).get("params", {}), sort_keys=True),
            spec.get("method"), json.dumps(spec.get("params", {}), sort_keys=True), "done",
            meta.get("created"), meta.get("duration_s"), _size(d), None, None,
        )
        self._query(lambda db: db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row), write=True)

    def _mark(self, key: str, spec: dict[str, Any], status: str, error: str | None = None) -> None:
        self._ensure()
        row = (
            key, key[:RUN_ID_LEN], spec["model"]["name"], spec["task"]["name"],
            json.dumps(spec["task"].get("params", {}), sort_keys=True), spec["method"],
            json.dumps(spec.get("params", {}), sort_keys=True), status, time.time(), None, None, error, os.getpid(),
        )
        self._query(lambda db: db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row), write=True)

    def _unmark(self, key: str) -> None:
        self._query(lambda db: db.execute("DELETE FROM runs WHERE key = ? AND status != 'done'", (key,)), write=True)

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        from filelock import FileLock

        self._ensure()
        with FileLock(str(self.root / "locks" / f"{name}.lock")):
            yield

    def get_or_compute(self, spec: dict[str, Any], compute: Callable[[], "Result"]) -> "Result":
        """The stored result for `spec`, or compute, store and return it.

        Concurrent callers with the same spec wait on a per-key lock, so it is computed once.
        A user error (WorkbenchError) inside `compute` leaves the store as it was; any other
        failure is recorded in the catalog as `failed` with its message.
        """
        key = content_key(spec)
        if self.has(key):
            return self._cached(key)
        with self._lock(key):
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
            shutil.rmtree(self.root / "checkpoints" / key, ignore_errors=True)
            result.meta["cached"] = False
            return result

    def _cached(self, key: str) -> "Result":
        result = self.get(key)
        result.meta["cached"] = True
        return result

    def delete(self, run_id: str) -> str:
        """Remove a run (atomically: renamed away first, then deleted)."""
        key = self.resolve(run_id)
        trash = self.root / "tmp" / f"{staging_name()}-deleted"
        trash.parent.mkdir(exist_ok=True)
        os.rename(self._run_dir(key), trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._query(lambda db: db.execute("DELETE FROM runs WHERE key = ?", (key,)), write=True)
        return key

    # -- activation caches, checkpoints, job files ---------------------------------------------
    def activations(self, key: str) -> Path | None:
        """The directory of a complete activation cache, or None."""
        self._check_format()
        path = self.root / "activations" / key[:2] / key
        return path if (path / "meta.json").is_file() else None

    @contextmanager
    def write_activations(self, key: str) -> Iterator[Path | None]:
        """Yield a staging directory for activation cache `key` (None when another writer stored it
        first); it becomes the cache when the block ends. One writer per key at a time."""
        with self._lock(f"activations-{key}"):
            if self.activations(key) is not None:
                yield None
                return
            with atomic_dir(self.root / "activations" / key[:2] / key, self.root / "tmp") as tmp:
                yield tmp

    def checkpoints(self, key: str) -> Path:
        """Where run `key` keeps its working state while it is computed (removed once it is stored)."""
        self._check_format()
        return self.root / "checkpoints" / key

    def save_checkpoint(self, key: str, step: int, write: Callable[[Path], None]) -> Path:
        """`write(dir)` fills a checkpoint of run `key` at `step`; it replaces the older ones."""
        root = self.checkpoints(key)
        final = root / f"step_{step:09d}"
        with atomic_dir(final, root, replace=True) as tmp:
            write(tmp)
        for old in root.iterdir():
            if old != final and writer_pid(old.name) is None:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self, key: str) -> Path | None:
        root = self.checkpoints(key)
        done = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
        return done[-1] if done else None

    def jobs_dir(self) -> Path:
        self._ensure()
        path = self.root / "jobs"
        path.mkdir(exist_ok=True)
        return path

    def write_job(self, name: str, text: str) -> Path:
        path = self.jobs_dir() / name
        write_file_atomic(path, text)
        return path

    def write_job_record(self, job_id: str, record: dict[str, Any]) -> None:
        """Replace a job's record (`workbench.job_record`) atomically: readers see the old or the new."""
        write_file_atomic(self.jobs_dir() / f"{job_id}.json", json.dumps(record, default=str))

    def job_records(self) -> list[dict[str, Any]]:
        """Every job record, newest first."""
        path = self.root / "jobs"
        records = []
        for f in sorted(path.glob("*.json"), reverse=True) if path.is_dir() else []:
            try:
                records.append(json.loads(f.read_text()))
            except ValueError:
                continue  # not a record this version wrote
        return records

    def job_record(self, job_id: str) -> dict[str, Any]:
        """One job's record, by id or unique id prefix."""
        matches = [r for r in self.job_records() if r["job_id"].startswith(job_id)]
        if len(matches) != 1:
            raise WorkbenchError(f"{'no' if not matches else 'more than one'} job '{job_id}' in store {self.root}; "
                                 f"`workbench jobs --store {self.root}` lists them")
        return matches[0]

    def job_files(self) -> list[Path]:
        """Job files started from the dashboard, newest first."""
        path = self.root / "jobs"
        return sorted(path.glob("*.toml"), reverse=True) if path.is_dir() else []

    # -- the catalog -------------------------------------------------------------------------
    def catalog_rows(self, **filters: str | None) -> list[dict[str, Any]]:
        """All runs (done, running, failed, interrupted), newest first, as plain dicts; filter on any
        column by equality (`params` and `task_params` by substring)."""
        for col in filters:
            if col not in CATALOG_COLUMNS:
                raise WorkbenchError(f"cannot filter runs on '{col}'; filter on one of {CATALOG_COLUMNS}")
        self._check_format()
        if not (self.root / "runs").is_dir():
            return []
        self._ensure()
        self._reconcile()
        cols = CATALOG_COLUMNS + ["pid"]
        rows = self._query(lambda db: db.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY created DESC").fetchall())
        out = []
        for values in rows:
            row = dict(zip(cols, values))
            if row["status"] == "running" and not (row["pid"] is not None and pid_alive(int(row["pid"]))):
                row["status"] = "interrupted"
            del row["pid"]
            if all(v is None or (v in str(row[c]) if c in ("params", "task_params") else row[c] == v) for c, v in filters.items()):
                out.append(row)
        return out

    def catalog(self, **filters: str | None) -> "pd.DataFrame":
        """`catalog_rows` as a frame."""
        import pandas as pd

        return pd.DataFrame(self.catalog_rows(**filters), columns=CATALOG_COLUMNS)

    def _reconcile(self) -> None:
        """Index runs present on disk but missing from the catalog (a writer killed between the
        rename and the catalog insert), and drop catalog rows whose run is gone."""
        on_disk = self._keys_on_disk()
        done = {k for (k,) in self._query(lambda db: db.execute("SELECT key FROM runs WHERE status = 'done'").fetchall())}
        for key in on_disk - done:
            if self.has(key):
                self._index(key)
        gone = done - on_disk
        if gone:
            self._query(lambda db: db.executemany("DELETE FROM runs WHERE key = ?", [(k,) for k in gone]), write=True)

    # -- garbage -----------------------------------------------------------------------------
    def gc(self, resumable: bool = False) -> dict[str, int]:
        """Remove what killed writers left: staging entries of dead processes, checkpoints of runs
        that are stored (and, with `resumable`, of unfinished runs too), and locks nobody holds.
        Returns counts and bytes freed."""
        from filelock import FileLock, Timeout

        self._check_format()
        out = {"staging": 0, "checkpoints": 0, "locks": 0, "bytes": 0, "kept_resumable": 0}

        def remove(path: Path, kind: str) -> None:
            out["bytes"] += _size(path)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            out[kind] += 1

        tmp = self.root / "tmp"
        for entry in tmp.iterdir() if tmp.is_dir() else []:
            pid = writer_pid(entry.name)
            if pid is None or not pid_alive(pid):
                remove(entry, "staging")
        running = {r["run_id"] for r in self.catalog_rows(status="running")} if (self.root / "runs").is_dir() else set()
        ckpts = self.root / "checkpoints"
        for run in ckpts.iterdir() if ckpts.is_dir() else []:
            for entry in run.iterdir():
                pid = writer_pid(entry.name)
                if pid is not None and not pid_alive(pid):
                    remove(entry, "staging")
            if run.name[:RUN_ID_LEN] in running:
                continue
            if self.has(run.name) or resumable:
                remove(run, "checkpoints")
            else:
                out["kept_resumable"] += 1
        locks = self.root / "locks"
        for lock in locks.iterdir() if locks.is_dir() else []:
            try:
                with FileLock(str(lock), timeout=0):
                    remove(lock, "locks")
            except Timeout:
                continue
        return out
