"""Read-only CLI commands on a 100-run store, against the floor of starting the CLI at all.

    .venv/bin/python benchmarks/cli_reads.py [--runs 100]

Fills a temporary store with `--runs` logit_diff runs of a toy model (one job file, a grid over
task seeds), then times each read-only command as a user runs it (a fresh process, best of 3),
and the same for `python -c "import workbench.cli"` (the floor), and prints the ratio.
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


def best_of(cmd: list[str], n: int = 3) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} failed: {proc.stderr}")
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    from conftest import make_toy_tl
    from workbench.models import save_tl_dir

    tmp = Path(tempfile.mkdtemp())
    save_tl_dir(make_toy_tl(), tmp / "toy")
    store = tmp / "store"
    (tmp / "job.toml").write_text(f'[[run]]\nmodel = "{tmp / "toy"}"\ntask = "induction"\n'
                                  f'task_params = {{ n_prompts = 4, seq_len = 5, seed = {list(range(args.runs))} }}\n'
                                  'method = "logit_diff"\n')
    filled = subprocess.run([WORKBENCH, "run", str(tmp / "job.toml"), "--store", str(store)], capture_output=True, text=True)
    run_id = filled.stdout.split()[0]
    floor = best_of([sys.executable, "-c", "import workbench.cli"])
    subprocess.run([WORKBENCH, "methods"], capture_output=True)  # the listing cache, as after a first use
    print(f"store of {args.runs} runs; floor (python -c 'import workbench.cli'): {floor:.2f} s")
    print(f"{'command':<10} {'seconds':>8} {'x floor':>8}")
    for name, cmd in [("ls", ["ls"]), ("show", ["show", run_id]), ("export", ["export", run_id, "--out", str(tmp / "s.csv"),
                      "--format", "csv"]), ("methods", ["methods"]), ("tasks", ["tasks"])]:
        extra = [] if name in ("methods", "tasks") else ["--store", str(store)]
        t = best_of([WORKBENCH, *cmd, *extra])
        print(f"{name:<10} {t:8.2f} {t / floor:8.1f}")
    t = best_of([WORKBENCH, "rm", run_id, "--store", str(store)], n=1)
    print(f"{'rm':<10} {t:8.2f} {t / floor:8.1f}")


if __name__ == "__main__":
    main()
