"""`workbench run JOB.toml --executor ray`: a job's units run on a Ray cluster.

Ray places the work, restarts dead workers and retries what they were running; this module only
keeps the local executor's promises on top of it:

- Workers are long-lived actors (`worker_cpus` CPUs each, plus one GPU for a unit on CUDA) that load a model
  once and serve many units; the driver hands a free worker a unit of the model it already holds
  when there is one. A worker holds one model at a time.
- A worker first *plans* a unit (loads model and task lazily, returns the store keys of the unit
  and of every run it needs), so the driver skips what is stored and sends along the stored
  results the unit needs. A unit is not started while another in flight computes one of its keys,
  so a need shared by many units is computed once.
- Results come back as files (meta.json, Parquet, safetensors bytes: nothing pickled) and the
  driver writes them to its store, keyed as the local executor keys them: the store needs no
  shared filesystem. With `shared_store` the workers open the store themselves (it must be on a
  path every node mounts) and write results, activation caches and checkpoints there, so a large
  activation cache is kept and a retried SAE training resumes from its checkpoint. Without it,
  activation caches and checkpoints stay in a worker's scratch folder for its lifetime.
- A worker that dies mid-unit (killed, out of memory, node lost) is restarted by Ray and the
  unit retried, up to `max_retries` times; each attempt is in the job record. A user error or a
  method's exception fails that unit alone, with its message, and is not retried.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from workbench.errors import WorkbenchError
from workbench.job_record import JobRecord
from workbench.spec import RunSpec
from workbench.store import RUN_ID_LEN

PROGRESS_EVERY_S = 1.0
POLL_S = 0.25


def _ray():
    try:
        import ray
    except ImportError:
        raise WorkbenchError("Ray is not installed in this environment; `make venv` installs it "
                             "(or `pip install ray==2.58.0`)") from None
    return ray


class Worker:
    """One Ray actor: a process that keeps its model between units (a plain class the driver makes remote)."""

    def __init__(self, store_root: str | None, threads: int):
        from workbench.store import Store

        # as many torch threads as CPUs Ray gave this worker (`configure_threads` reads it when a model loads):
        # two workers on two cores with two threads each spin against each other, ~10x slower per unit
        os.environ["WORKBENCH_THREADS"] = str(threads)
        self.shared = store_root is not None
        self.scratch = None if self.shared else tempfile.mkdtemp(prefix="workbench-worker-")
        self.store = Store(store_root if self.shared else self.scratch)
        self.node = f"{socket.gethostname()} ({_ray().util.get_node_ip_address()})"

    def plan(self, spec_json: dict[str, Any]) -> dict[str, Any]:
        """The store keys `run(spec)` reads or writes, the unit's own last; or why it cannot run here."""
        from workbench.runner import plan, unload_other_models, weights_loaded

        spec = RunSpec.from_json(spec_json)
        unload_other_models(spec)
        had_weights = weights_loaded(spec)
        try:
            keys = [key for key, _ in plan(spec)]
            return {"ok": True, "keys": keys, "loaded_model": weights_loaded(spec) and not had_weights}
        except WorkbenchError as e:
            return {"ok": False, "message": str(e), "user_error": True}
        except Exception as e:
            return {"ok": False, "message": f"{type(e).__name__}: {e}", "user_error": False,
                    "traceback": traceback.format_exc()}

    def compute(self, index: int, spec_json: dict[str, Any], shipped: list[dict[str, bytes]],
                wanted: list[str], events) -> dict[str, Any]:
        """Run one unit into this worker's store (after storing the results it needs that the
        driver shipped) and return the files of `wanted` keys (none with a shared store). Its
        start and its progress go to the driver through the `events` queue."""
        from workbench.progress import reporting
        from workbench.runner import run, unload_other_models, weights_loaded

        events.put(("start", index, self.node, os.getpid()))
        spec = RunSpec.from_json(spec_json)
        unload_other_models(spec)
        for files in shipped:
            self.store.put_files(files)
        had_weights = weights_loaded(spec)
        last = [0.0]

        def report(desc: str, n: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or (total is not None and n >= total):
                last[0] = now
                events.put(("progress", index, {"desc": desc, "n": n, "total": total}))

        try:
            with reporting(report):
                result = run(spec, self.store)
        except WorkbenchError as e:
            return {"ok": False, "message": str(e), "user_error": True}
        except Exception as e:
            return {"ok": False, "message": f"{type(e).__name__}: {e}", "user_error": False,
                    "traceback": traceback.format_exc()}
        files = [] if self.shared else [self.store.entry_files(k) for k in wanted if self.store.has(k)]
        return {"ok": True, "run_id": result.run_id, "files": files,
                "loaded_model": weights_loaded(spec) and not had_weights}

    def close(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class _Slot:
    """A worker actor as the driver sees it."""

    actor: Any
    gpu: bool
    model: Any = None  # the ModelSpec it last ran


@dataclass
class _Unit:
    index: int
    spec: RunSpec
    gpu: bool
    keys: list[str] = field(default_factory=list)


def connect(options) -> bool:
    """Join the cluster at `options.address`, or start a local instance on 127.0.0.1. True when this
    call started or joined (so the caller disconnects), False when this process was already connected."""
    if options.address is None:
        # Ray's switch for a single-machine instance: every Ray process binds to 127.0.0.1 (read when ray is
        # imported, and inherited by the processes the instance starts), so nothing listens on the network
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _ray()
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level="WARNING")
    if options.address not in (None, "auto"):
        _check_reachable(options.address)
    try:
        if options.address is None:
            ray.init(address="local", include_dashboard=options.dashboard, **quiet)
        else:
            ray.init(address=options.address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = options.address or "a local instance"
        raise WorkbenchError(f"cannot reach Ray at {where} ({e}); start a head with `ray start --head` and pass "
                             f"its address (HOST:6379), or leave out --address for a local instance") from None
    return True


@contextmanager
def ray_session(options) -> Iterator[None]:
    """Connected to Ray (joined or started) for the block, with the cluster checked against the
    options before a job is recorded: an unreachable address or too wide a worker writes nothing."""
    opened = connect(options)
    ray = _ray()
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if options.worker_cpus > max(cpus, 1):
            raise WorkbenchError(f"--worker-cpus {options.worker_cpus} is more than the cluster's {cpus} CPUs; "
                                 f"ask for at most {cpus}")
        yield
    finally:
        if opened:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """A quick TCP connect to the head's port: Ray itself waits minutes for an address nothing serves."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise WorkbenchError(f"--address {address} is not HOST:PORT (or auto); the head prints its address "
                             f"when `ray start --head` starts it")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise WorkbenchError(f"nothing answers at {address} ({e.strerror or e}); start a head there with "
                             f"`ray start --head --port {port}`, or leave out --address for a local instance") from None


def run_on_ray(specs: list[RunSpec], store, record: JobRecord, options) -> None:
    """Run every unit of a job on the connected Ray cluster, recording each unit's state in `record`."""
    _Driver(_ray(), specs, store, record, options).run()


class _Driver:
    def __init__(self, ray, specs: list[RunSpec], store, record: JobRecord, options):
        from ray.util.queue import Queue

        self.ray, self.store, self.record, self.options = ray, store, record, options
        resources = ray.cluster_resources()
        self.cpus, self.gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        self.units = [_Unit(i, s, _wants_gpu(s, self.gpus)) for i, s in enumerate(specs)]
        self.events = Queue(actor_options={"num_cpus": 0})
        self.remote_worker = ray.remote(Worker)
        self.slots: list[_Slot] = []
        self.in_flight: dict[Any, tuple[_Unit, _Slot]] = {}  # Ray object ref -> what it computes, where

    # -- workers ----------------------------------------------------------------------------
    def _start_worker(self, gpu: bool) -> _Slot:
        cpus = self.options.worker_cpus
        opts = dict(num_cpus=cpus, num_gpus=1 if gpu else 0, max_restarts=-1, max_task_retries=self.options.max_retries)
        root = str(self.store.root.resolve()) if self.options.shared_store else None
        slot = _Slot(self.remote_worker.options(**opts).remote(root, cpus), gpu)
        self.slots.append(slot)
        return slot

    def _replace(self, slot: _Slot) -> None:
        self.ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)
        self._start_worker(slot.gpu)

    def _size_pool(self, units: list[_Unit]) -> None:
        for gpu, capacity in ((False, self.cpus // self.options.worker_cpus), (True, self.gpus)):
            wanted = min(sum(u.gpu == gpu for u in units), max(capacity, 1 if not gpu else 0))
            while sum(s.gpu == gpu for s in self.slots) < wanted:
                self._start_worker(gpu)

    # -- the job ----------------------------------------------------------------------------
    def run(self) -> None:
        runnable = []
        for unit in self.units:
            if unit.gpu and not self.gpus:
                self._fail(unit, f"the model is on '{unit.spec.model.device}' but the Ray cluster has no GPU; "
                                 f"join a cluster with GPUs (--address) or set the model's device to cpu")
            else:
                runnable.append(unit)
        self._size_pool(runnable)
        try:
            self._plan(runnable)
            self._compute([u for u in runnable if u.keys])
        finally:
            for slot in self.slots:
                try:
                    self.ray.get(slot.actor.close.remote(), timeout=10)
                except self.ray.exceptions.RayError:
                    pass  # a dead worker has no scratch folder left to remove
                self.ray.kill(slot.actor, no_restart=True)

    def _plan(self, units: list[_Unit]) -> None:
        """Every unit's keys, planned on the workers in parallel; stored units are skipped."""
        for n, unit in enumerate(units):
            pool = [s for s in self.slots if s.gpu == unit.gpu]
            slot = pool[n % len(pool)]
            self.in_flight[slot.actor.plan.remote(unit.spec.to_json())] = (unit, slot)
        while self.in_flight:
            for ref, (unit, slot) in self._finished():
                try:
                    out = self.ray.get(ref)
                except self.ray.exceptions.RayError as e:
                    self._fail(unit, _system_failure(e), user_error=False)
                    continue
                if not out["ok"]:
                    self._fail(unit, out["message"], out["user_error"], out.get("traceback"))
                    continue
                if out["loaded_model"]:  # building the task read the weights
                    self.record.update(unit.index, loaded_model=True)
                if self.store.has(out["keys"][-1]):
                    self.record.update(unit.index, state="skipped", run_id=out["keys"][-1][:RUN_ID_LEN],
                                       finished=time.time())
                else:
                    unit.keys = out["keys"]

    def _compute(self, units: list[_Unit]) -> None:
        todo = list(units)
        while todo or self.in_flight:
            busy = {k for u, _ in self.in_flight.values() for k in u.keys if not self.store.has(k)}
            free = [s for s in self.slots if not any(s is slot for _, slot in self.in_flight.values())]
            for slot in free:
                unit = _pick(todo, slot, busy)
                if unit is None:
                    continue
                todo.remove(unit)
                self._submit(unit, slot)
                busy |= set(unit.keys)
            for ref, (unit, slot) in self._finished():
                try:
                    out = self.ray.get(ref)
                except self.ray.exceptions.RayError as e:
                    self._fail(unit, _system_failure(e), user_error=False)
                    self._replace(slot)
                    continue
                if not out["ok"]:
                    self._fail(unit, out["message"], out["user_error"], out.get("traceback"))
                    continue
                for files in out["files"]:
                    self.store.put_files(files)
                loaded = out["loaded_model"] or self.record.data["units"][unit.index].get("loaded_model", False)
                self.record.update(unit.index, state="done", run_id=out["run_id"], progress=None, finished=time.time(),
                                   loaded_model=loaded)

    def _submit(self, unit: _Unit, slot: _Slot) -> None:
        wanted = [k for k in unit.keys if not self.store.has(k)]
        if not wanted:  # stored meanwhile (the same unit twice in a job)
            self.record.update(unit.index, state="skipped", run_id=unit.keys[-1][:RUN_ID_LEN], finished=time.time())
            return
        shipped = [] if self.options.shared_store else [self.store.entry_files(k) for k in unit.keys if k not in wanted]
        slot.model = unit.spec.model
        ref = slot.actor.compute.remote(unit.index, unit.spec.to_json(), shipped, wanted, self.events)
        self.in_flight[ref] = (unit, slot)

    def _finished(self) -> list[tuple[Any, tuple[_Unit, _Slot]]]:
        """Wait a little for results, record what the workers reported meanwhile, and return the
        finished calls."""
        if not self.in_flight:
            return []
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=POLL_S)
        self._drain_events()
        return [(ref, self.in_flight.pop(ref)) for ref in ready]

    def _drain_events(self) -> None:
        """Workers' reports into the record: a unit's (re)start with its node and pid, its progress."""
        waiting = self.events.qsize()  # only this driver takes from the queue, so they are all there
        for event in self.events.get_nowait_batch(waiting) if waiting else []:
            if event[0] == "start":
                _, index, node, pid = event
                attempts = self.record.data["units"][index]["attempts"] + 1
                self.record.update(index, state="running", node=node, pid=pid, attempts=attempts, started=time.time())
            else:
                _, index, progress = event
                if self.record.data["units"][index]["state"] == "running":
                    self.record.update(index, progress=progress)

    def _fail(self, unit: _Unit, message: str, user_error: bool = True, trace: str | None = None) -> None:
        unit.keys = []
        self.record.update(unit.index, state="failed", message=message, user_error=user_error, traceback=trace,
                           progress=None, finished=time.time())


def _pick(todo: list[_Unit], slot: _Slot, busy: set[str]) -> _Unit | None:
    """The next unit for a free worker: of its kind (CPU/GPU), none of whose missing keys another
    unit is computing, of the model it holds when there is one."""
    fits = [u for u in todo if u.gpu == slot.gpu and not (set(u.keys) & busy)]
    same = [u for u in fits if u.spec.model == slot.model]
    return (same or fits or [None])[0]


def _wants_gpu(spec: RunSpec, gpus: int) -> bool:
    """A unit on CUDA gets a GPU; a unit with no device asked runs on one when the cluster has one."""
    device = spec.model.device
    return (device is not None and device.startswith("cuda")) or (device is None and gpus > 0)


def _system_failure(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"worker lost after every retry ({type(e).__name__}: {first})"
