"""`workbench run --executor ray` on a real Ray, on this machine: a local instance started by the
command itself, and a cluster started with `ray start --head` on 127.0.0.1 and joined with
--address (one for all the tests here). Faults are injected by killing real processes: the worker
computing a unit (its pid is in the job record) and the driver itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import WORKBENCH, make_toy_tl
from workbench.job_record import job_state
from workbench.store import Store

RAY = str(Path(sys.executable).parent / "ray")
ONE_THREAD = {**os.environ, "WORKBENCH_THREADS": "1"}  # the local executor then sums as a one-CPU worker does


def wb(*args, store, env=None, timeout=600):
    return subprocess.run([WORKBENCH, *map(str, args), "--store", str(store)], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ)


def start(*args, store):
    return subprocess.Popen([WORKBENCH, *map(str, args), "--store", str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def record(store_dir: Path) -> dict:
    records = Store(store_dir).job_records()
    assert len(records) >= 1
    return records[0]


def wait_for(condition, timeout: float = 180, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out waiting")


def latest_units(store_dir: Path) -> list[dict]:
    records = Store(store_dir).job_records() if (store_dir / "jobs").is_dir() else []
    return records[0]["units"] if records else []


def stored(store_dir: Path) -> dict[str, float]:
    """Every stored run's key with its meta.json's mtime."""
    return {p.name: (p / "meta.json").stat().st_mtime for p in (store_dir / "runs").glob("*/*")}


def assert_same_results(a: Path, b: Path) -> None:
    sa, sb = Store(a), Store(b)
    assert set(stored(a)) == set(stored(b))
    for key in stored(a):
        pd.testing.assert_frame_equal(sa.scores(key), sb.scores(key), check_exact=True)
        ta, tb = sa.tensors(key), sb.tensors(key)
        assert ta.keys() == tb.keys() and all((ta[n] == tb[n]).all() for n in ta)


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster with 2 CPUs, started as a user starts one, on 127.0.0.1 (one for this file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True, timeout=300)
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def slow_toy(tmp_path_factory):
    """A 5-layer toy on which one ACDC unit takes seconds (~2.5 s on 2 cores; a 3-layer one took
    0.6-1.0 s, too close to the half second the killed-worker test waits): long enough to kill its
    worker mid-unit, and for a driver to be killed with units left."""
    from workbench.models import save_tl_dir

    path = tmp_path_factory.mktemp("toy5") / "toy-attn-5l"
    save_tl_dir(make_toy_tl(n_layers=5, seed=3), path)
    return path


def acdc_job(path: Path, model: Path, seeds: list[int], n_prompts: int) -> Path:
    return write_job(path, f"""
[[run]]
model = "{model}"
task = "induction"
task_params = {{ n_prompts = {n_prompts}, seq_len = 8, seed = {seeds} }}
method = "discovery.acdc"
""")


@pytest.mark.slow
def test_a_local_ray_instance_gives_the_local_executors_results(tmp_path, toy_dir):
    job = write_job(tmp_path / "grid.toml", f"""
[[run]]
model = "{toy_dir}"
task = "induction"
task_params = {{ n_prompts = [4, 8], seq_len = 6 }}
method = ["logit_diff", "heads.ablation", "discovery.eap"]

[[run]]
model = "{toy_dir}"
task = "induction"
task_params = {{ n_prompts = 8, seq_len = 6 }}
method = "circuit.faithfulness"
params = {{ discovery = {{ method = "discovery.eap" }}, fractions = [0.1, 1.0] }}
""")
    local = wb("run", job, store=tmp_path / "local", env=ONE_THREAD)
    assert local.returncode == 0, local.stderr
    on_ray = wb("run", job, "--executor", "ray", store=tmp_path / "ray")
    assert on_ray.returncode == 0, on_ray.stderr
    assert_same_results(tmp_path / "local", tmp_path / "ray")
    assert [line.split()[0] for line in on_ray.stdout.splitlines()] == [line.split()[0] for line in local.stdout.splitlines()]
    rec = record(tmp_path / "ray")
    assert rec["executor"] == "ray" and rec["address"] is None and job_state(rec) == "done"
    assert [u["state"] for u in rec["units"]] == ["done"] * 7
    assert all("127.0.0.1" in u["node"] and u["attempts"] == 1 for u in rec["units"])


def test_a_cluster_joined_with_address_runs_the_job_and_a_user_error_fails_alone(tmp_path, toy_dir, ray_head):
    job = write_job(tmp_path / "job.toml", f"""
[[run]]
model = "{toy_dir}"
task = "induction"
task_params = {{ n_prompts = 4, seq_len = 6 }}
method = "logit_diff"

[[run]]
model = "{toy_dir}"
task = "induction"
task_params = {{ n_prompts = 4, seq_len = 6 }}
method = "heads.ablation"
params = {{ heads = ["L7H0"] }}

[[run]]
model = "{toy_dir}"
task = "induction"
task_params = {{ n_prompts = 6, seq_len = 6 }}
method = "logit_diff"
""")
    proc = wb("run", job, "--executor", "ray", "--address", ray_head, store=tmp_path / "s")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "heads.ablation" in failed[0] and "L7H0 is outside the model" in failed[0]
    assert "3 runs: 2 computed, 0 already in the store, 1 failed" in proc.stderr
    rec = record(tmp_path / "s")
    assert rec["address"] == ray_head and job_state(rec) == "failed"
    assert [u["state"] for u in rec["units"]] == ["done", "failed", "done"]
    assert rec["units"][1]["attempts"] <= 1 and "L7H0" in rec["units"][1]["message"]  # not retried
    assert len(stored(tmp_path / "s")) == 2
    listed = subprocess.run([WORKBENCH, "jobs", rec["job_id"], "--store", str(tmp_path / "s")], capture_output=True, text=True)
    assert listed.returncode == 0 and "failed" in listed.stdout and "L7H0 is outside the model" in listed.stdout


def test_a_killed_worker_is_retried_and_every_result_is_stored_once(tmp_path, slow_toy, ray_head):
    job = acdc_job(tmp_path / "acdc.toml", slow_toy, [0, 1, 2], n_prompts=32)
    driver = start("run", job, "--executor", "ray", "--address", ray_head, store=tmp_path / "s")
    victim = wait_for(lambda: next(((i, u["pid"]) for i, u in enumerate(latest_units(tmp_path / "s"))
                                    if u["state"] == "running"), None))
    time.sleep(0.5)
    os.kill(victim[1], signal.SIGKILL)
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr
    rec = record(tmp_path / "s")
    assert [u["state"] for u in rec["units"]] == ["done"] * 3
    killed = rec["units"][victim[0]]
    assert killed["attempts"] == 2 and killed["pid"] != victim[1]
    assert sorted(u["attempts"] for u in rec["units"]) == [1, 1, 2]
    assert len(stored(tmp_path / "s")) == 3
    assert sorted(r["run_id"] for r in Store(tmp_path / "s").catalog_rows()) == sorted(u["run_id"] for u in rec["units"])


def test_a_killed_driver_reruns_to_completion_without_recomputing_what_was_stored(tmp_path, slow_toy, ray_head):
    job = acdc_job(tmp_path / "acdc.toml", slow_toy, [10, 11, 12, 13], n_prompts=24)
    args = ("run", job, "--executor", "ray", "--address", ray_head)
    driver = start(*args, store=tmp_path / "s")
    wait_for(lambda: any(u["state"] == "done" for u in latest_units(tmp_path / "s")))
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    first = record(tmp_path / "s")
    assert job_state(first) == "interrupted"
    before = stored(tmp_path / "s")
    assert 1 <= len(before) < 4
    proc = wb(*args, store=tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    rerun = record(tmp_path / "s")
    assert rerun["job_id"] != first["job_id"]
    skipped = {u["run_id"] for u in rerun["units"] if u["state"] == "skipped"}
    assert skipped == {key[:16] for key in before}
    assert sum(u["state"] == "done" for u in rerun["units"]) == 4 - len(before)
    after = stored(tmp_path / "s")
    assert len(after) == 4 and all(after[key] == mtime for key, mtime in before.items())  # not rewritten


@pytest.mark.parametrize("shared", [False, True], ids=["shipped", "shared-store"])
def test_an_sae_unit_ships_its_result_or_writes_the_shared_store_with_its_activation_cache(tmp_path, toy_dir,
                                                                                           ray_head, shared):
    job = write_job(tmp_path / "sae.toml", f"""
[[run]]
model = "{toy_dir}"
task = "induction"
task_params = {{ n_prompts = 32, seq_len = 12 }}
method = "sae.train"
params = {{ layer = 1, expansion_factor = 2, n_tokens = 8000, batch_size = 128, eval_prompts = 4 }}
""")
    flags = ["--shared-store"] if shared else []
    proc = wb("run", job, "--executor", "ray", "--address", ray_head, *flags, store=tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.split()[0]
    result = Store(tmp_path / "s").get(run_id)
    assert result.meta["layer"] == 1 and set(result.tensors) >= {"W_enc", "W_dec"}
    caches = list((tmp_path / "s").glob("activations/*/*/meta.json"))
    assert len(caches) == (1 if shared else 0)  # a shipped run leaves the cache in the worker's scratch folder
