"""Ray executor against the local executor, each timed as a user runs it (`workbench run ...`,
whole command, fresh store), in one run:

1. overhead: a 12-unit grid of short units (ACDC on a 2-layer toy model, ~1 s each) under
   `--executor ray` (a local instance started by the command) and `--executor local`;
2. model reuse: a 24-unit grid on the embedded model through Ray, model loads counted from the job
   record (units whose worker read the weights), against 24 separate `workbench run` processes;
3. with --sweep: examples/discovery_sweep.toml end to end through `--executor ray`, its wall time.

    .venv/bin/python benchmarks/batch.py [--sweep]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
WORKBENCH = str(Path(sys.executable).parent / "workbench")


def timed_run(job: Path, store: Path, *flags: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([WORKBENCH, "run", str(job), "--store", str(store), *flags], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{job.name} {flags} failed:\n{proc.stderr[-2000:]}")
    return elapsed


def job_record(store: Path) -> dict:
    from workbench.store import Store

    return Store(store).job_records()[0]


def overhead(tmp: Path) -> None:
    from conftest import make_toy_tl
    from workbench.models import save_tl_dir

    save_tl_dir(make_toy_tl(), tmp / "toy")
    job = tmp / "grid12.toml"
    job.write_text(f'[[run]]\nmodel = "{tmp / "toy"}"\ntask = "induction"\n'
                   f'task_params = {{ n_prompts = 32, seq_len = 8, seed = {list(range(12))} }}\nmethod = "discovery.acdc"\n')
    local = timed_run(job, tmp / "local12")
    on_ray = timed_run(job, tmp / "ray12", "--executor", "ray")
    units = [u["finished"] - u["started"] for u in job_record(tmp / "local12")["units"]]
    print(f"1. 12 short units (local: {min(units):.2f}-{max(units):.2f} s each): local {local:.1f} s, "
          f"ray {on_ray:.1f} s -> ray/local {on_ray / local:.2f} (target <= 1.3)")


def model_reuse(tmp: Path) -> None:
    job = tmp / "grid24.toml"
    grid = ('task = ["ioi", "reciprocal"]\ntask_params = { n_prompts = 4, seed = [0, 1, 2] }\n'
            'method = ["logit_diff", "attribution.dla", "heads.detect", "attribution.logit_lens"]\n')
    job.write_text(f'[[run]]\nmodel = "smollm2-135m"\n{grid}')
    subprocess.run([WORKBENCH, "run", str(job), "--store", str(tmp / "warm")], capture_output=True)  # model cache built
    on_ray = timed_run(job, tmp / "ray24", "--executor", "ray")
    record = job_record(tmp / "ray24")
    loads = sum(bool(u.get("loaded_model")) for u in record["units"])
    workers = len({u["pid"] for u in record["units"]})
    from workbench.jobs import load_job

    separate = 0.0
    for i, spec in enumerate(load_job(job)):
        one = tmp / f"one{i}.toml"
        t = spec.task
        one.write_text(f'[[run]]\nmodel = "smollm2-135m"\ntask = "{t.name}"\n'
                       f'task_params = {{ n_prompts = 4, seed = {t.params.seed} }}\nmethod = "{spec.method}"\n')
        separate += timed_run(one, tmp / "separate")
    print(f"2. 24 units on the embedded model through Ray: {on_ray:.1f} s, {loads} model loads on {workers} workers; "
          f"24 separate `workbench run` processes: {separate:.1f} s -> {separate / on_ray:.1f}x")


def sweep(tmp: Path) -> None:
    wall = timed_run(ROOT / "examples" / "discovery_sweep.toml", tmp / "sweep", "--executor", "ray")
    record = job_record(tmp / "sweep")
    states = [u["state"] for u in record["units"]]
    print(f"3. discovery sweep ({len(states)} units, {states.count('done')} computed): {wall:.0f} s through --executor ray")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also run examples/discovery_sweep.toml (minutes)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="workbench-batch-"))
    overhead(tmp)
    model_reuse(tmp)
    if args.sweep:
        sweep(tmp)


if __name__ == "__main__":
    main()
