"""The `workbench` command. User errors print one line and exit 2, with nothing written."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from workbench.errors import WorkbenchError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Mechanistic-interpretability workbench: heads, circuits, one results store.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StoreOpt = typer.Option(None, "--store", help="Store directory (default: $WORKBENCH_HOME or ~/.workbench).")
APP_FILE = Path(__file__).resolve().parent.parent / "app" / "Home.py"
DEMO_JOB = Path(__file__).resolve().parent / "demo_job.toml"


def _store(path: Optional[Path]):
    from workbench.store import Store

    return Store(path)


class _JobView:
    """The job's progress on the terminal, drawn from its record: one bar over units (done/total,
    failures) and one line per running unit with its own progress where the method reports it."""

    def __init__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                            TimeElapsedColumn(), console=err, transient=False)
        self.units = self.bar.add_task("units", count="")
        self.running: dict[int, int] = {}
        self.shown = False

    def __enter__(self) -> "_JobView":
        return self

    def __exit__(self, *exc) -> None:
        if self.shown:  # drawn from the job's first change on, so a job refused before it starts prints only its error
            self.bar.__exit__(*exc)

    def __call__(self, record: dict) -> None:
        from workbench.job_record import counts

        if not self.shown:
            self.bar.__enter__()
            self.shown = True
        c, n = counts(record), len(record["units"])
        finished = c["done"] + c["skipped"] + c["failed"]
        self.bar.update(self.units, total=n, completed=finished, count=f"{finished}/{n}",
                        description=f"units ({c['failed']} failed)" if c["failed"] else "units")
        for i, unit in enumerate(record["units"]):
            if unit["state"] != "running":
                if i in self.running:
                    self.bar.remove_task(self.running.pop(i))
                continue
            p = unit.get("progress") or {}
            desc = f"  {unit['label'][:60]}" + (f": {p['desc']}" if p.get("desc") else "")
            count = f"{p['n']}/{p['total'] if p.get('total') is not None else '?'}" if p else ""
            if i not in self.running:
                self.running[i] = self.bar.add_task(desc, total=None, count=count)
            self.bar.update(self.running[i], description=desc, completed=p.get("n", 0), total=p.get("total"), count=count)


def _run_job(job: Path, store_dir: Optional[Path], executor: str, ray=None) -> list:
    from workbench.jobs import EXECUTORS, RayOptions, execute, load_job

    runs = load_job(job)
    if executor not in EXECUTORS:
        raise WorkbenchError(f"unknown executor '{executor}'; available: {', '.join(EXECUTORS)}")
    store = _store(store_dir)
    store.catalog_rows()  # a store of another format is refused before anything runs
    with _JobView() as view:  # the local executor validates every unit's model and task first (`prepare`)
        job_outcome = execute(runs, store, executor, source=str(job), text=job.read_text(encoding="utf-8"),
                              listener=view, ray=ray or RayOptions())
    outcomes = job_outcome.outcomes
    for o in outcomes:
        if o.state == "failed":
            continue
        out.print(f"{o.run_id}  {'cached  ' if o.cached else 'computed'}  {o.spec.label()}")
        for warning in store.meta(o.run_id).get("warnings", []):
            err.print(f"warning: run {o.run_id}: {warning}", markup=False)
    failed = [o for o in outcomes if o.state == "failed"]
    for o in failed:
        err.print(f"failed: {o.spec.label()}: {o.message}", markup=False)
    computed = sum(o.state == "done" for o in outcomes)
    err.print(f"{len(outcomes)} runs: {computed} computed, {sum(o.cached for o in outcomes)} already in the store, "
              f"{len(failed)} failed ({store.root}); job {job_outcome.job_id} (`workbench jobs {job_outcome.job_id}`)")
    if failed:
        sys.exit(2 if all(o.user_error for o in failed) else 1)
    return outcomes


@app.command()
def run(job: Path = typer.Argument(..., help="Job file (TOML) listing runs; list values expand to a grid."),
        store: Optional[Path] = StoreOpt,
        executor: str = typer.Option("local", help="Where runs execute: 'local' (this process) or 'ray' (a Ray cluster)."),
        address: Optional[str] = typer.Option(None, help="With --executor ray: the cluster to join (auto or HOST:PORT); "
                                                          "without it a local Ray instance is started on 127.0.0.1."),
        max_retries: int = typer.Option(3, "--max-retries", min=0, help="With --executor ray: retries of a unit whose worker died."),
        shared_store: bool = typer.Option(False, "--shared-store", help="With --executor ray: workers write to --store "
                                          "themselves (a path every node mounts; keeps activation caches and checkpoints)."),
        worker_cpus: int = typer.Option(1, "--worker-cpus", min=1, help="With --executor ray: CPUs (torch threads) per "
                                        "worker; fewer, wider workers suit memory-bound units on small machines."),
        ray_dashboard: bool = typer.Option(False, "--ray-dashboard", help="With a local Ray instance: serve Ray's dashboard.")):
    """Run every (model, task, method, params) of a job file into the store; stored runs are skipped."""
    from workbench.jobs import RayOptions

    if executor != "ray" and (address or shared_store or ray_dashboard or worker_cpus != 1):
        raise WorkbenchError("--address, --shared-store, --worker-cpus and --ray-dashboard apply to --executor ray; "
                             "add it or drop them")
    _run_job(job, store, executor, RayOptions(address, max_retries, shared_store, ray_dashboard, worker_cpus))


@app.command()
def jobs(job_id: Optional[str] = typer.Argument(None, help="A job id (or its start): show its units."),
         store: Optional[Path] = StoreOpt):
    """List jobs, newest first; with a job id, its units (state, run, node, attempts, failure)."""
    from workbench.job_record import counts, job_state

    s = _store(store)
    if job_id is None:
        records = s.job_records()
        if not records:
            err.print(f"no jobs in {s.root}; `workbench run JOB.toml --store {s.root}` starts one")
        for r in records:
            c = counts(r)
            out.print(f"{r['job_id']}  {job_state(r):<11} {r['executor']:<5} {c['done']} computed, {c['skipped']} stored, "
                      f"{c['failed']} failed, {c['pending'] + c['running']} to go of {len(r['units'])}  {r['file']}",
                      markup=False)
        return
    r = s.job_record(job_id)
    state = job_state(r)
    out.print(f"job {r['job_id']}: {state}, {r['executor']}{' at ' + r['address'] if r.get('address') else ''}, "
              f"file {r['file']}", markup=False)
    for i, u in enumerate(r["units"]):
        unit_state = "interrupted" if state == "interrupted" and u["state"] == "running" else u["state"]
        out.print(f"{i:>4}  {unit_state:<11} {u['run_id'] or '-':<16}  attempts {u['attempts']}  {u['node'] or '-'}  "
                  f"{u['label']}", markup=False)
        if u["message"]:
            out.print(f"      {u['message']}", markup=False)


@app.command("ls")
def ls(store: Optional[Path] = StoreOpt,
       model: Optional[str] = typer.Option(None, help="Only runs of this model name."),
       task: Optional[str] = typer.Option(None, help="Only runs of this task."),
       method: Optional[str] = typer.Option(None, help="Only runs of this method."),
       status: Optional[str] = typer.Option(None, help="done, running, failed or interrupted.")):
    """List runs, one a line, starting with the run id."""
    rows = _store(store).catalog_rows(model=model, task=task, method=method, status=status)
    if not rows:
        err.print(f"no runs in {_store(store).root}; try `workbench demo --no-serve` or `workbench run JOB.toml`")
        return
    for r in rows:
        out.print(f"{r['run_id']}  {r['status']:<11} {r['model']}  {r['task']} {r['task_params']}  {r['method']} {r['params']}")


@app.command()
def show(run_id: str, store: Optional[Path] = StoreOpt,
         rows: int = typer.Option(20, help="How many score rows to print.")):
    """Print a run's metadata and its first score rows."""
    s = _store(store)
    meta = s.meta(run_id)
    spec = meta["spec"]
    out.print(f"run {meta['run_id']}: {spec['method']} on {spec['task']['name']} with {spec['model']['name']} "
              f"(params {spec['params']}, {meta.get('duration_s') or 0:.2f} s)")
    for line in _reported(meta):
        out.print(line, markup=False)
    out.print(_text_table(s.score_table(run_id).slice(0, rows)), markup=False)


@app.command()
def export(run_id: str, format: str = typer.Option("parquet", "--format", help="parquet, csv, or mib-json (a circuit's edges)."),
           out_file: Path = typer.Option(..., "--out", help="File to write."), store: Optional[Path] = StoreOpt):
    """Write a run's score frame to a Parquet or CSV file, or a discovery run's edges as MIB circuit JSON."""
    if format not in ("parquet", "csv", "mib-json"):
        raise WorkbenchError(f"unknown export format '{format}'; use parquet, csv or mib-json")
    if not out_file.parent.is_dir():
        raise WorkbenchError(f"folder {out_file.parent} does not exist; create it or give --out a path in an existing folder")
    if out_file.is_dir():
        raise WorkbenchError(f"{out_file} is a folder; give --out a file name, e.g. {out_file / 'scores.' + format}")
    import json

    import pyarrow as pa

    s = _store(store)
    table = s.score_table(run_id)
    if format == "mib-json":
        _export_mib(s, run_id, table, out_file)
        return
    if format == "csv":
        import pyarrow.csv as pc

        for i, field in enumerate(table.schema):  # list cells (a masking run's heads) as JSON text
            if pa.types.is_list(field.type):
                table = table.set_column(i, field.name, pa.array([json.dumps(v) if v is not None else None
                                                                  for v in table.column(i).to_pylist()], pa.string()))
        pc.write_csv(table, out_file)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, out_file)
    err.print(f"wrote {table.num_rows} rows of run {s.meta(run_id)['run_id']} to {out_file}")


def _export_mib(store, run_id: str, table, out_file: Path) -> None:
    import json

    from workbench.atomic import write_file_atomic
    from workbench.methods import get_method
    from workbench.mib import mib_circuit

    meta = store.meta(run_id)
    spec = meta["spec"]
    outputs = get_method(spec["method"]).declared(spec["params"])
    names = [m.name for m in outputs.metrics if m.components == ("edge",) and m.role in ("effect", "score")]
    rows = [r for r in table.to_pylist() if r["metric"] in names[:1]]
    write_file_atomic(out_file, json.dumps(mib_circuit(rows, meta["model_shape"])))
    err.print(f"wrote {len(rows)} edges of run {meta['run_id']} to {out_file} (MIB circuit JSON)")


def _text_table(table) -> str:
    """Rows of a pyarrow table as aligned text, leaving out columns empty in every shown row."""
    rows = table.to_pylist()
    cols = [c for c in table.column_names if any(r[c] is not None for r in rows)]

    def cell(v):
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)

    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


@app.command()
def rm(run_id: str, store: Optional[Path] = StoreOpt):
    """Delete one run from the store."""
    key = _store(store).delete(run_id)
    err.print(f"deleted run {key[:16]}")


@app.command()
def gc(store: Optional[Path] = StoreOpt,
       resumable: bool = typer.Option(False, "--resumable", help="Also drop checkpoints of unfinished runs (they cannot resume then).")):
    """Remove what killed writers left: staging folders, stale checkpoints, locks nobody holds."""
    s = _store(store)
    found = s.gc(resumable=resumable)
    err.print(f"removed {found['staging']} staging folders, {found['checkpoints']} checkpoint folders and {found['locks']} "
              f"unheld locks ({found['bytes'] / 2**20:.1f} MiB) from {s.root}"
              + (f"; kept {found['kept_resumable']} checkpoints of unfinished runs (--resumable drops them)"
                 if found["kept_resumable"] else ""))


@app.command()
def models(all: bool = typer.Option(False, "--all", help="Also list every Hugging Face name TransformerLens supports.")):
    """List registry models (and, with --all, hub names TransformerLens supports)."""
    from workbench.models import DEFAULT_MODEL, REGISTRY

    for name, entry in REGISTRY.items():
        out.print(f"{name}  {entry.description}{'  [default]' if name == DEFAULT_MODEL else ''}")
    out.print("DIR  a local TransformerLens model directory (config.json + model.safetensors) or Hugging Face directory")
    if all:
        from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

        for name in OFFICIAL_MODEL_NAMES:
            out.print(f"{name}  (Hugging Face hub)")


@app.command()
def tasks():
    """List task generators with their parameters and defaults."""
    from workbench.listing import listing

    for line in listing("tasks"):
        out.print(line, markup=False)


@app.command()
def methods():
    """List registered methods, one a line, name first, with their natural task and parameters."""
    from workbench.listing import listing

    for line in listing("methods"):
        out.print(line, markup=False)


def _serve(store_dir: Optional[Path], host: str, port: int) -> None:
    from workbench.store import Store

    root = Store(store_dir).root
    env = {**os.environ, "WORKBENCH_HOME": str(root)}
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.address", host, "--server.port", str(port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    err.print(f"dashboard on http://{host}:{port} (store {root}); Ctrl-C stops it")
    sys.stdout.flush()
    sys.stderr.flush()
    # become the server, so Ctrl-C and a terminating parent reach it directly (no orphaned child)
    os.execve(sys.executable, cmd, env)


@app.command()
def dashboard(store: Optional[Path] = StoreOpt, host: str = typer.Option("127.0.0.1", help="Address to serve on."),
              port: int = typer.Option(8501, help="Port.")):
    """Serve the dashboard on the store until interrupted."""
    _serve(store, host, port)


@app.command()
def demo(store: Optional[Path] = StoreOpt, serve: bool = typer.Option(True, "--serve/--no-serve", help="Serve the dashboard afterwards."),
         host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8501)):
    """The main job: the demo analyses on the embedded model into the store, then the dashboard."""
    outcomes = _run_job(DEMO_JOB, store, "local")
    root = _store(store).root
    out.print(f"results are in {root}: `workbench ls --store {root}`, `workbench show RUN_ID --store {root}`")
    for o in outcomes:
        line = _summary(_store(store).get(o.run_id), o.spec.task.label(), o.spec.method)
        if line:
            out.print(line)
    if serve:
        _serve(store, host, port)


def _reported(meta: dict) -> list[str]:
    """What a run reports besides its scores: how many tests counted, its responses, its warnings."""
    lines = []
    if "counted_tests" in meta:
        lines.append(f"counted tests: {meta['counted_tests']} of {meta['tests']}")
    if "baseline_accuracy" in meta:
        lines.append(f"unmasked baseline: {meta['answered_unmasked']} of {meta['tests']} tests answered "
                     f"({meta['baseline_accuracy']:.2f}); heads chosen on {meta['selection']}")
    responses = meta.get("responses")
    if isinstance(responses, dict):
        responses = responses.get("none", [])
    for i, r in enumerate(responses or []):
        lines.append(f"response {i}: {r!r}")
    lines += [f"warning: {w}" for w in meta.get("warnings", [])]
    return lines


def _summary(result, task: str, method: str) -> str | None:
    """One line a researcher wants first from a demo result."""
    from workbench.nodes import head_name

    scores = result.scores
    if method == "logit_diff":
        return (f"{task}: mean logit diff clean {result.value('logit_diff_clean_mean'):.3f}, "
                f"corrupted {result.value('logit_diff_corrupted_mean'):.3f}")
    if method == "sae.train":
        return (f"{task} sae.train: layer {result.meta['layer']}, {result.meta['d_sae']} features, L0 {result.value('sae_l0'):.1f}, "
                f"explained variance {result.value('sae_explained_variance'):.2f}, "
                f"KL recovered {result.value('kl_recovered'):.1%} (held-out windows)")
    heads = scores[(scores["component"] == "head") & scores["metric"].isin(["patch_logit_diff", "dla"])]
    if "prompt" in heads:
        heads = heads[heads["prompt"].isna()]
    if heads.empty:
        return None
    top = heads.reindex(heads["value"].abs().sort_values(ascending=False).index).head(5)
    listed = ", ".join(f"{head_name(r.layer, r.head)} {r.value:+.2f}" for r in top.itertuples())
    return f"{task} {method}: top heads {listed}"


def main() -> None:
    try:
        app(standalone_mode=False)
    except WorkbenchError as e:
        err.print(f"error: {e}", markup=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # a missing argument, an unknown option: typer's usage message, no traceback
        e.show()
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
