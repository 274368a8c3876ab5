import json
import subprocess

import pandas as pd
import pytest

from workbench.store import Store

from conftest import WORKBENCH, needs


def wb(*args, store=None):
    cmd = [WORKBENCH, *map(str, args)] + (["--store", str(store)] if store is not None else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def snapshot(path):
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


@pytest.fixture()
def grid_job(tmp_path, toy_dir):
    job = tmp_path / "grid.toml"
    job.write_text(f"""
[[run]]
model = "{toy_dir}"
task = "induction"
task_params = {{ n_prompts = [4, 8], seq_len = 5 }}
method = "logit_diff"
""")
    return job


def test_two_run_grid_writes_two_results_and_a_rerun_computes_nothing(tmp_path, grid_job):
    store = tmp_path / "store"
    first = wb("run", grid_job, store=store)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 2 and all(" computed " in line for line in lines)
    before = snapshot(store / "runs")
    second = wb("run", grid_job, store=store)
    assert second.returncode == 0 and all(" cached " in line for line in second.stdout.splitlines())
    assert snapshot(store / "runs") == before
    listed = wb("ls", store=store).stdout.splitlines()
    assert sorted(line.split()[0] for line in listed) == sorted(line.split()[0] for line in lines)
    assert sum('"n_prompts": 4' in line for line in listed) == 1 and sum('"n_prompts": 8' in line for line in listed) == 1
    # each command is a job in the store: newest first, with its units
    jobs = wb("jobs", store=store).stdout.splitlines()
    assert len(jobs) == 2 and " done " in jobs[0] and "0 computed, 2 stored, 0 failed, 0 to go of 2" in jobs[0]
    assert "2 computed, 0 stored" in jobs[1] and jobs[1].endswith(str(grid_job))
    units = wb("jobs", jobs[1].split()[0], store=store).stdout.splitlines()
    assert units[0].startswith(f"job {jobs[1].split()[0]}: done, local")
    assert sorted(line.split()[2] for line in units[1:]) == sorted(line.split()[0] for line in lines)
    assert_user_error(wb("jobs", "1999", store=store), "no job '1999'")


def test_export_csv_and_parquet_hold_the_stored_scores(tmp_path, grid_job):
    store = tmp_path / "store"
    run_id = wb("run", grid_job, store=store).stdout.split()[0]
    wb("export", run_id, "--format", "csv", "--out", tmp_path / "s.csv", store=store)
    wb("export", run_id, "--format", "parquet", "--out", tmp_path / "s.parquet", store=store)
    csv, pq = pd.read_csv(tmp_path / "s.csv"), pd.read_parquet(tmp_path / "s.parquet")
    assert len(csv) == len(pq) > 0
    assert set(pq["metric"]) >= {"logit_diff_clean_mean", "logit_diff_corrupted_mean"}
    assert csv["value"].tolist() == pytest.approx(pq["value"].tolist())


def assert_user_error(proc, fragment):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_job_file(tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text("[[run]\nmodel = ")
    store = tmp_path / "store"
    assert_user_error(wb("run", job, store=store), "is not valid TOML")
    assert snapshot(store) is None


def test_unknown_model_leaves_the_store_unchanged(tmp_path, grid_job):
    store = tmp_path / "store"
    wb("run", grid_job, store=store)
    before = snapshot(store)
    job = tmp_path / "unknown.toml"
    job.write_text('[[run]]\nmodel = "gpt-9000-imaginary"\ntask = "ioi"\nmethod = "logit_diff"\n')
    assert_user_error(wb("run", job, store=store), "unknown model 'gpt-9000-imaginary'")
    assert snapshot(store) == before


def test_mismatched_prompt_pair_fails_before_any_run_is_written(tmp_path, toy_dir):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"clean": [1, 2, 3], "corrupted": [4, 5, 6], "answer": 7, "wrong": 8}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"clean": [1, 2, 3], "corrupted": [4, 5], "answer": 7, "wrong": 8}) + "\n")
    job = tmp_path / "job.toml"
    job.write_text(f'[[run]]\nmodel = "{toy_dir}"\ntask_file = ["good.jsonl", "bad.jsonl"]\nmethod = "logit_diff"\n')
    store = tmp_path / "store"
    assert_user_error(wb("run", job, store=store), "line 1: clean prompt is 3 tokens but corrupted is 2")
    assert snapshot(store) is None


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('[[run]]\ntask = "ioi"\n', "missing 'method'"),
        ('[[run]]\nmethod = "nope"\n', "unknown method 'nope'"),
        ('[[run]]\nmethod = "logit_diff"\nparams = { batch = 3 }\n', "has no parameter(s) ['batch']"),
        ('[[run]]\nmethod = "logit_diff"\ntask = "ioi"\ntask_params = { n_prompts = "x" }\n', "should be int"),
        ('[runs]\nmethod = "logit_diff"\n', "unknown top-level key(s) ['runs']"),
        ('[[run]]\nmethod = "patching.attn_head"\nparams = { metric = "accuracy" }\n', "'metric' = 'accuracy' should be one of"),
        ('[[run]]\nmethod = "patching.resid"\nparams = { direction = "sideways" }\n', "should be one of 'denoise', 'noise'"),
        ('[[run]]\nmethod = "patching.attn_head"\nparams = { chunk_tokens = 0 }\n', "chunk_tokens = 0 must be at least 1"),
        ('[[run]]\nmethod = "heads.ablation"\nparams = { heads = ["head5"] }\n', "'head5' is not a head name"),
        ('[[run]]\nmethod = "retrieval.masking"\ntask = "needle"\nparams = { ks = [0, 5] }\n', "must be head counts"),
        ('[[run]]\nmethod = "heads.sinks"\nparams = { threshold = 1.5 }\n', "give a value in (0, 1)"),
        ('[[run]]\nmethod = "retrieval.masking"\ntask = "needle"\nparams = { scores = { method = "heads.detect" } }\n',
         "scores must name a retrieval.score run"),
        ('[[run]]\nmethod = "retrieval.masking"\ntask = "needle"\nparams = { min_baseline = 2 }\n', "min_baseline = 2"),
        ('[[run]]\nmethod = "retrieval.score"\ntask = "needle"\ntask_params = { prompt_format = "html" }\n',
         "should be one of 'auto', 'chat', 'plain'"),
        ('[[run]]\nmethod = "sae.dfa"\nparams = { sae = { method = "logit_diff" } }\n', "holds no SAE"),
    ],
)
def test_invalid_runs_are_refused(tmp_path, body, fragment, capsys, monkeypatch):
    job = tmp_path / "job.toml"
    job.write_text(body)
    assert_user_error(wb_here(capsys, monkeypatch, "run", job, "--store", tmp_path / "store"), fragment)
    assert snapshot(tmp_path / "store") is None


def wb_here(capsys, monkeypatch, *args):
    """The CLI's entry point in this process (what a subprocess would run, without its start-up cost)."""
    from types import SimpleNamespace

    from workbench.cli import main

    monkeypatch.setattr("sys.argv", ["workbench", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main()
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exit.value.code, stdout=captured.out, stderr=captured.err)


@pytest.mark.parametrize("args,fragment", [(["show"], "Missing argument 'run_id'"),
                                           (["show", "0123", "--bogus"], "No such option: --bogus")])
def test_a_command_line_typer_refuses_gets_its_usage_message_and_exit_2(capsys, monkeypatch, tmp_path, args, fragment):
    """A missing argument or an unknown option: the usage message, exit code 2, no traceback."""
    proc = wb_here(capsys, monkeypatch, *args, "--store", tmp_path / "s")
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(tmp_path / "s") is None


def test_a_job_file_that_is_not_text_is_refused(tmp_path):
    job = tmp_path / "job.toml"
    job.write_bytes(b"\xff\xfe[[run]]\x00\x81")
    assert_user_error(wb("run", job, store=tmp_path / "store"), "is not UTF-8 text")
    assert snapshot(tmp_path / "store") is None


def test_export_into_a_missing_folder_is_refused(tmp_path, grid_job):
    store = tmp_path / "store"
    run_id = wb("run", grid_job, store=store).stdout.split()[0]
    before = snapshot(store)
    assert_user_error(wb("export", run_id, "--format", "csv", "--out", tmp_path / "no" / "such" / "s.csv", store=store),
                      "does not exist")
    assert not (tmp_path / "no").exists() and snapshot(store) == before


def test_a_damaged_catalog_is_rebuilt_and_an_old_store_refused(tmp_path, grid_job):
    store = tmp_path / "store"
    ids = sorted(line.split()[0] for line in wb("run", grid_job, store=store).stdout.splitlines())
    for f in store.glob("catalog.sqlite*"):
        f.unlink()
    (store / "catalog.sqlite").write_bytes(b"garbage" * 500)
    listed = wb("ls", store=store)
    assert listed.returncode == 0 and sorted(line.split()[0] for line in listed.stdout.splitlines()) == ids
    (store / "store.json").unlink()  # what a format-1 store looks like
    before = snapshot(store)
    assert_user_error(wb("ls", store=store), "has format 1")
    assert_user_error(wb("run", grid_job, store=store), "has format 1")
    assert snapshot(store) == before


def test_gc_reports_what_it_removed(tmp_path, grid_job):
    store = tmp_path / "store"
    wb("run", grid_job, store=store)
    leftover = store / "tmp" / f"{2**22 + 12345}-{'0' * 32}"  # a pid above Linux's pid_max: no such process
    leftover.mkdir(parents=True)
    (leftover / "part").write_bytes(b"x" * 4096)
    proc = wb("gc", store=store)
    assert proc.returncode == 0 and "removed 1 staging folders" in proc.stderr and not leftover.exists()
    assert len(wb("ls", store=store).stdout.splitlines()) == 2


def test_listing_commands_put_the_name_first():
    methods = wb("methods").stdout.splitlines()
    assert "logit_diff" in [line.split()[0] for line in methods]
    assert {"ioi", "induction", "factual", "needle", "corpus"} <= {line.split()[0] for line in wb("tasks").stdout.splitlines()}
    assert wb("models").stdout.split()[0] == "smollm2-135m"


@needs("ray")
def test_ray_options_without_ray_and_an_address_nothing_serves_are_refused(tmp_path, grid_job):
    store = tmp_path / "store"
    assert_user_error(wb("run", grid_job, "--address", "127.0.0.1:6379", store=store), "apply to --executor ray")
    assert_user_error(wb("run", grid_job, "--executor", "ray", "--address", "127.0.0.1:1", store=store), "nothing answers at")
    assert snapshot(store) is None


def test_unknown_run_id_and_bad_executor(tmp_path, grid_job):
    assert_user_error(wb("show", "abcd1234", store=tmp_path / "empty"), "no run 'abcd1234'")
    assert_user_error(wb("run", grid_job, "--executor", "slurm", store=tmp_path / "s"), "unknown executor 'slurm'")


def test_demo_computes_then_finds_everything_in_the_store(demo_store):
    store, first = demo_store
    assert "ioi: mean logit diff clean" in first.stdout and "corpus sae.train: layer 15, 2304 features, L0 24.0" in first.stdout
    second = wb("demo", "--no-serve", store=store)
    assert second.returncode == 0 and " computed " not in second.stdout and " cached " in second.stdout
    # the dashboard the demo ends with shows its results: the head atlas joins them per head
    from app.data import done_runs, head_metrics, head_table

    table = head_table(head_metrics(Store(store), done_runs(Store(store))))
    assert len(table) == 30 * 9
    metrics = {c.split(" · ")[0] for c in table.columns}
    assert {"patch_logit_diff", "dla", "induction_score", "sink_alpha", "retrieval_score", "attn_distance_mean",
            "sae_polysemantic"} <= metrics


def test_hub_model_offline_is_one_clear_error(tmp_path):
    job = tmp_path / "hub.toml"
    job.write_text('[[run]]\nmodel = "gpt2"\nmethod = "logit_diff"\n')
    proc = subprocess.run([WORKBENCH, "run", str(job), "--store", str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert_user_error(proc, "could not fetch 'gpt2' from the Hugging Face hub")
    assert snapshot(tmp_path / "s") is None


@needs("streamlit")
def test_dashboard_serves_on_localhost(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([WORKBENCH, "dashboard", "--store", str(tmp_path / "s"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read().decode()
            except OSError:
                time.sleep(0.5)
        assert body == "ok"
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow  # the embedded model, in a subprocess
def test_circuit_methods_run_from_a_job_file_and_export_in_the_schema(tmp_path):
    job = tmp_path / "circuit.toml"
    job.write_text("""
[[run]]
model = "smollm2-135m"
task = "ioi"
task_params = { n_prompts = 3 }
method = "patching.attn_head"
params = { heads = ["L23H3", "L24H4"], by_position = true }

[[run]]
task = "ioi"
task_params = { n_prompts = 3 }
method = "attribution.dla"

[[run]]
task = "ioi"
task_params = { n_prompts = 3 }
method = "patching.path"
params = { receivers = ["L23H3"], receiver_input = "v", senders = ["L11H5", "L16H1"] }
""")
    store = tmp_path / "store"
    proc = wb("run", job, store=store)
    assert proc.returncode == 0, proc.stderr
    run_ids = [line.split()[0] for line in proc.stdout.splitlines()]
    assert len(run_ids) == 3
    for run_id in run_ids:
        out = tmp_path / f"{run_id}.csv"
        assert wb("export", run_id, "--format", "csv", "--out", out, store=store).returncode == 0
        frame = pd.read_csv(out)
        assert list(frame.columns[:6]) == ["component", "layer", "head", "position", "metric", "value"]
        assert frame["value"].notna().all()


def test_show_reports_counted_tests_baseline_responses_and_warnings():
    from workbench.cli import _reported

    score = {"counted_tests": 1, "tests": 4, "responses": ["blue harbor", ""], "warnings": ["answered only 1 of 4"]}
    assert _reported(score) == ["counted tests: 1 of 4", "response 0: 'blue harbor'", "response 1: ''",
                                "warning: answered only 1 of 4"]
    masking = {"tests": 2, "answered_unmasked": 2, "baseline_accuracy": 1.0, "selection": "held-out needles",
               "responses": {"none": ["a", "b"], "retrieval 5": ["", ""]}, "warnings": []}
    assert _reported(masking) == ["unmasked baseline: 2 of 2 tests answered (1.00); heads chosen on held-out needles",
                                  "response 0: 'a'", "response 1: 'b'"]
