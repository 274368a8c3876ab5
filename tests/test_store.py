import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from store_writer import result, spec
from workbench.errors import WorkbenchError
from workbench.result import Result
from workbench.store import Store, content_key

WRITER = str(Path(__file__).with_name("store_writer.py"))


def writer(store, *args):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen([sys.executable, WRITER, str(store.root), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, text=True)


def test_put_get_roundtrip(store):
    r = result(3)
    key = store.put(spec(3), r)
    back = store.get(key[:16])
    pd.testing.assert_frame_equal(back.scores, r.scores)
    assert torch.equal(back.tensors["big"], r.tensors["big"])
    assert back.meta["spec"] == spec(3) and back.run_id == key[:16]


def test_a_run_shipped_as_files_lands_under_its_own_key_in_another_store(store, tmp_path):
    import json

    key = store.put(spec(4), result(4))
    files = store.entry_files(key)
    assert set(files) == {"meta.json", "scores.parquet", "tensors.safetensors"}
    other = Store(tmp_path / "driver")
    assert other.put_files(files) == key
    back = other.get(key)
    pd.testing.assert_frame_equal(back.scores, store.get(key).scores)
    assert torch.equal(back.tensors["big"], result(4).tensors["big"])
    assert [r["run_id"] for r in other.catalog_rows()] == [key[:16]]
    assert other.put_files(files) == key and len(other.catalog_rows()) == 1  # a second copy changes nothing
    forged = {**files, "meta.json": json.dumps({**json.loads(files["meta.json"]), "spec": spec(5)}).encode()}
    with pytest.raises(ValueError, match="is not the hash of its spec"):
        Store(tmp_path / "third").put_files(forged)
    with pytest.raises(ValueError, match="expected meta.json"):
        Store(tmp_path / "third").put_files({**files, "model.pkl": b""})
    assert not (tmp_path / "third").exists()


def test_get_or_compute_computes_once_and_keys_on_every_input(store):
    calls = []

    def compute(i):
        calls.append(i)
        return result(i)

    a = store.get_or_compute(spec(1), lambda: compute(1))
    b = store.get_or_compute(spec(1), lambda: compute(1))
    assert calls == [1] and a.meta["cached"] is False and b.meta["cached"] is True
    changed = [dict(spec(1), params={"i": 2}), dict(spec(1), model={"name": "m", "weights_hash": "x"}), dict(spec(1), task={"name": "t2"})]
    assert len({content_key(s) for s in changed} | {content_key(spec(1))}) == 4


def test_user_error_in_compute_leaves_the_store_unchanged(store):
    store.put(spec(0), result(0))
    before = store.catalog()

    def bad():
        raise WorkbenchError("bad input")

    with pytest.raises(WorkbenchError):
        store.get_or_compute(spec(9), bad)
    pd.testing.assert_frame_equal(store.catalog(), before)
    assert not store.has(content_key(spec(9)))


def test_other_failures_are_recorded_as_failed(store):
    def broken():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        store.get_or_compute(spec(5), broken)
    row = store.catalog().iloc[0]
    assert row["status"] == "failed" and "out of memory" in row["error"]


def test_corrupted_entry_gives_a_clear_error(store):
    key = store.put(spec(2), result(2))
    (store.root / "runs" / key[:2] / key / "scores.parquet").write_bytes(b"not parquet")
    with pytest.raises(WorkbenchError, match="is corrupted"):
        store.get(key[:16])


def test_catalog_is_rebuilt_from_the_runs_when_lost(store):
    keys = {store.put(spec(i), result(i)) for i in range(3)}
    store.root.joinpath("catalog.sqlite").unlink()
    for extra in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        store.root.joinpath(extra).unlink(missing_ok=True)
    assert set(store.catalog()["run_id"]) == {k[:16] for k in keys}


def test_a_damaged_catalog_is_rebuilt_from_the_runs(store):
    keys = {store.put(spec(i), result(i)) for i in range(3)}
    for extra in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        store.root.joinpath(extra).unlink(missing_ok=True)
    store.root.joinpath("catalog.sqlite").write_bytes(b"this is not a database" * 100)
    assert set(store.catalog()["run_id"]) == {k[:16] for k in keys}
    assert len(Store(store.root).catalog()) == 3  # the rebuilt catalog is a working one


def test_a_store_of_another_format_is_refused_before_anything_is_written(tmp_path):
    old = tmp_path / "old"
    (old / "runs" / "ab").mkdir(parents=True)  # format 1 had runs/ and no store.json
    for call in (lambda s: s.catalog(), lambda s: s.put(spec(1), result(1)), lambda s: s.has("ab" * 32)):
        with pytest.raises(WorkbenchError, match="format 1"):
            call(Store(old))
    assert sorted(p.name for p in old.iterdir()) == ["runs"]
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "store.json").write_text('{"format": 99}')
    with pytest.raises(WorkbenchError, match="format 99"):
        Store(newer).catalog()


def test_gc_removes_what_dead_writers_left_and_keeps_live_work(store):
    stored = store.put(spec(1), result(1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftovers = [store.root / "tmp" / f"{dead_pid}-{'a' * 32}", store.root / "tmp" / f"{os.getpid()}-{'b' * 32}"]
    for d in leftovers:
        d.mkdir(parents=True)
        (d / "part.bin").write_bytes(b"x" * 1000)
    store.save_checkpoint(stored, 5, lambda d: (d / "state.json").write_text("{}"))  # its run is stored: stale
    unfinished = "c" * 64
    store.save_checkpoint(unfinished, 7, lambda d: (d / "state.json").write_text("{}"))  # resumable: kept
    (store.root / "locks" / "orphan.lock").write_text("")
    found = store.gc()
    assert found["staging"] == 1 and found["checkpoints"] == 1 and found["kept_resumable"] == 1
    assert found["locks"] >= 1 and found["bytes"] >= 1000
    assert not leftovers[0].exists() and leftovers[1].exists()  # a live writer's staging folder stays
    assert store.latest_checkpoint(unfinished).name == "step_000000007"
    assert store.latest_checkpoint(stored) is None and not (store.root / "locks" / "orphan.lock").exists()
    assert store.gc(resumable=True)["checkpoints"] == 1 and store.latest_checkpoint(unfinished) is None
    assert len(store.get(stored[:16]).scores) == 2000  # the stored run itself is untouched


def test_filters_and_delete(store):
    store.put(spec(1), result(1))
    k2 = store.put(dict(spec(2), method="other"), result(2))
    assert list(store.catalog(method="other")["run_id"]) == [k2[:16]]
    store.delete(k2[:16])
    assert len(store.catalog()) == 1 and not store.has(k2)
    with pytest.raises(WorkbenchError, match="no run"):
        store.get(k2[:16])


def test_killing_a_writer_never_leaves_a_partial_result(tmp_path):
    """SIGKILL a process that keeps writing 1 MB results, at random instants, many times."""
    store = Store(tmp_path / "s")
    rng = random.Random(0)
    for _ in range(10):
        p = writer(store, "loop", 4)
        assert p.stdout.readline().strip() == "writing"  # imports done; from now on it writes non-stop
        time.sleep(rng.uniform(0.05, 0.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
    runs = store.catalog()
    assert len(runs) > 0
    for run_id in runs["run_id"]:
        r = store.get(run_id)
        i = r.meta["spec"]["params"]["i"]
        assert len(r.scores) == 2000 and (r.scores["value"] == i).all()
        assert torch.equal(r.tensors["big"], torch.full((256, 1024), float(i)))
    on_disk = {d.name[:16] for shard in (store.root / "runs").iterdir() for d in shard.iterdir()}
    assert on_disk == set(runs["run_id"])  # every run directory is a listed, loadable result
    # the kills did land mid-write (staging directories were left behind), and are cleaned up
    assert store.gc()["staging"] > 0
    assert list((store.root / "tmp").iterdir()) == []


def test_concurrent_writers_compute_each_key_once(tmp_path):
    store = Store(tmp_path / "s")
    log = tmp_path / "computed.log"
    shared = list(range(6))
    procs = [writer(store, "compute", log, *shared[w:] + shared[:w], 100 + w) for w in range(4)]
    reads = 0
    while any(p.poll() is None for p in procs):  # a reader at the same time sees only whole results
        runs = store.catalog()
        for run_id in runs.loc[runs["status"] == "done", "run_id"]:
            r = store.get(run_id)
            assert len(r.scores) == 2000 and (r.scores["value"] == r.meta["spec"]["params"]["i"]).all()
            reads += 1
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert reads > 0
    computed = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert sorted(computed) == sorted(shared + [100, 101, 102, 103])  # each key exactly once
    runs = store.catalog()
    assert len(runs) == 10 and set(runs["status"]) == {"done"}
    for run_id in runs["run_id"]:
        r = store.get(run_id)
        assert (r.scores["value"] == r.meta["spec"]["params"]["i"]).all()


def test_result_schema_is_enforced():
    with pytest.raises(ValueError, match="unknown component"):
        Result(pd.DataFrame({"component": ["neuron"], "metric": ["m"], "value": [1.0]}))
    r = Result(pd.DataFrame({"component": ["head"], "layer": [1], "head": [2], "metric": ["m"], "value": [1]}))
    assert list(r.scores.columns[:6]) == ["component", "layer", "head", "position", "metric", "value"]
    assert str(r.scores["position"].dtype) == "Int64" and r.scores["value"].dtype == "float64"
