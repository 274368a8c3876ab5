"""Every dashboard page through Streamlit's AppTest, on a store populated by real runs on a toy
model: the pages must show what the store holds (cells, top heads, patterns), not just render."""

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit", reason="streamlit is not installed here (`make test` installs it)")
from streamlit.testing.v1 import AppTest  # noqa: E402

from workbench.runner import run_method
from workbench.store import Store
from workbench.tasks import build_task

HOME = str(Path(__file__).resolve().parent.parent / "app" / "Home.py")
PAGES = ["runs", "head_atlas", "head_detail", "circuit", "features", "prompt_explorer", "launch", "jobs"]
RUNS = [
    ("logit_diff", {}),
    ("patching.attn_head", {}),
    ("attribution.dla", {}),
    ("heads.detect", {}),
    ("heads.sinks", {}),
    ("heads.distance", {}),
    ("attention.patterns", {"n_prompts": 2}),
    ("attribution.head_sources", {"heads": ["L1H2"]}),
    ("patching.path", {"receivers": ["L1H0"]}),
    ("discovery.eap", {}),
    ("circuit.faithfulness", {"discovery": {"method": "discovery.eap"}}),
]


@pytest.fixture(scope="module")
def populated(tmp_path_factory, toy, toy_dir):
    store = Store(tmp_path_factory.mktemp("app") / "store")
    task = build_task(toy, "induction", {"n_prompts": 4, "seq_len": 6})
    results = {m: run_method(toy, task, m, p, store) for m, p in RUNS}
    sae_task = build_task(toy, "induction", {"n_prompts": 40, "seq_len": 10})
    results["sae.train"] = run_method(toy, sae_task, "sae.train", {"layer": 1, "expansion_factor": 2, "n_tokens": 5120,
                                                                   "batch_size": 128, "eval_prompts": 4}, store)
    return store, results, str(toy_dir)


def app(store, page=None, **query):
    at = AppTest.from_file(HOME, default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
    return at


def figures(at):
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def array(value) -> np.ndarray:
    """A figure's data array: plotly writes numpy arrays as typed base64 blocks, lists as lists."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return out.reshape([int(x) for x in str(value.get("shape", len(out))).split(",")]).astype(float)
    return np.array(value, dtype=float)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_on_an_empty_store_says_how_to_start(tmp_path, monkeypatch, page):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "empty"))
    at = app(None, None if page == "runs" else page)
    assert not at.exception
    if page in ("runs", "head_atlas", "head_detail", "circuit", "features"):
        assert "workbench demo" in at.info[0].value
    elif page == "launch":  # the form offers every registered method
        from workbench.methods import all_methods

        assert {o.split(" - ")[0] for o in at.selectbox[1].options} == set(all_methods())
    elif page == "jobs":
        assert "workbench run JOB.toml" in at.info[0].value
    else:  # the prompt explorer asks for a prompt to run
        assert at.text_area[0].label == "Prompt"


def test_runs_page_lists_opens_and_deletes_with_confirmation(tmp_path, monkeypatch, toy):
    store = Store(tmp_path / "s")
    for n in (3, 4):
        run_method(toy, build_task(toy, "induction", {"n_prompts": n, "seq_len": 5}), "logit_diff", {}, store)
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store)
    assert not at.exception
    catalog, scores = at.dataframe[0].value, at.dataframe[1].value
    assert len(catalog) == 2 and set(catalog["status"]) == {"done"}
    chosen = at.selectbox[0].value
    assert len(scores) == len(store.get(chosen).scores)
    delete = next(b for b in at.button if b.label == "Delete run")
    assert delete.disabled  # until "I am sure" is ticked
    at.checkbox[0].check().run()
    next(b for b in at.button if b.label == "Delete run").click().run()
    assert not at.exception
    assert len(store.catalog()) == 1 and chosen not in set(store.catalog()["run_id"])


def test_head_atlas_maps_every_head_and_ranks_the_table_by_the_stored_values(populated, monkeypatch, toy):
    store, results, _ = populated
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "head_atlas")
    assert not at.exception
    maps = [f for f in figures(at) if f["data"][0]["type"] == "heatmap"]
    assert maps and maps[0]["layout"]["title"]["text"] in ("eap_head", "patch_logit_diff")  # causal effects are mapped first
    for fig in maps:
        z = array(fig["data"][0]["z"])
        assert z.shape == (toy.n_layers, toy.n_heads)
    # the induction-score map holds exactly the stored scores
    label = next(lab for lab in at.multiselect[1].options if lab.startswith("induction_score"))
    at.multiselect[1].set_value([label]).run()
    maps = [f for f in figures(at) if f["data"][0]["type"] == "heatmap"]
    fig = next(f for f in maps if f["layout"]["title"]["text"] == label.split(" · ")[0])
    stored = results["heads.detect"].metric("induction_score").sort_values(["layer", "head"])["value"].to_numpy()
    assert np.allclose(array(fig["data"][0]["z"]).flatten(), stored)
    # sort the joined table by that metric (signed): the top row is the stored argmax
    sort_box = next(s for s in at.selectbox if s.label == "Sort by")
    sort_box.set_value(label).run()
    next(t for t in at.toggle if t.label == "Sort by absolute value").set_value(False).run()
    table = at.dataframe[0].value
    best = results["heads.detect"].metric("induction_score").sort_values("value").iloc[-1]
    assert table.iloc[0]["name"] == f"L{best['layer']}H{best['head']}"
    assert len(table) == toy.n_layers * toy.n_heads
    for metric, method in (("dla", "attribution.dla"), ("sink_alpha", "heads.sinks"), ("retrieval_score", None)):
        found = [c for c in table.columns if c.startswith(f"{metric} · induction") and c.endswith(f"/ {method}")]
        assert len(found) == (1 if method else 0), metric


def test_head_page_deep_link_shows_its_scores_pattern_sources_and_distance(populated, monkeypatch, toy):
    store, results, _ = populated
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "head_detail", model=toy.name, head="L1H2")
    assert not at.exception
    assert at.title[0].value == f"L1H2 of {toy.name}"
    scores = at.dataframe[0].value
    dla = results["attribution.dla"].scores
    dla = dla[(dla["metric"] == "dla") & dla["prompt"].isna() & (dla["layer"] == 1) & (dla["head"] == 2)]["value"].item()
    assert scores[scores["metric"] == "dla"]["value"].item() == pytest.approx(dla)
    figs = figures(at)
    pattern = array(figs[0]["data"][0]["z"])
    stored = results["attention.patterns"].tensors["pattern"][0, 1, 2].numpy()
    assert np.allclose(pattern, stored[: pattern.shape[0], : pattern.shape[1]], atol=1e-6)
    assert len(figs) == 3  # pattern, DLA by source position (stored for L1H2), distance profile
    sae = results["sae.train"]
    features = at.dataframe[-1].value  # the head's top SAE features, by head attribution
    attribution = sae.tensors["head_attribution"][:, 2]
    live = sae.metric("feature_frequency").sort_values("feature")["value"].to_numpy() > 0
    best = max((f for f in range(len(attribution)) if live[f]), key=lambda f: float(attribution[f]))
    assert features["feature"].iloc[0] == best and features["attribution"].iloc[0] == pytest.approx(float(attribution[best]))
    assert features["open"].iloc[0] == f"features?model={toy.name}&sae={sae.run_id}&feature={best}&head=L1H2"


def test_features_page_shows_a_features_examples_histogram_attribution_and_logit_effects(populated, monkeypatch, toy):
    store, results, _ = populated
    sae = results["sae.train"]
    t = sae.tensors
    feature = int(t["example_max"][:, 0].argmax())
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "features", model=toy.name, sae=sae.run_id, feature=str(feature))
    assert not at.exception
    assert at.number_input[0].value == feature
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["L0"]) == pytest.approx(sae.value("sae_l0"), rel=1e-2)
    attribution, histogram, top, bottom = figures(at)
    assert np.allclose(array(attribution["data"][0]["y"]), t["head_attribution"][feature].numpy(), atol=1e-6)
    assert np.allclose(array(histogram["data"][0]["y"]), t["activation_histogram"][feature].numpy())
    assert np.allclose(array(top["data"][0]["x"]), t["logit_top_values"][feature].numpy(), atol=1e-5)
    assert np.allclose(array(bottom["data"][0]["x"]), t["logit_bottom_values"][feature].numpy(), atol=1e-5)
    examples = [m.value for m in at.markdown if "rgba(255,140,0" in m.value]
    assert len(examples) == int((t["example_max"][feature] > 0).sum()) > 0
    assert examples[0].startswith(f"**{float(t['example_max'][feature, 0]):.3f}**")
    assert "rgba(255,140,0,1.00)" in examples[0]  # the top example's peak token is fully shaded


def test_head_page_refuses_a_head_outside_the_model(populated, monkeypatch, toy):
    store, _, _ = populated
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "head_detail", model=toy.name, head="L9H9")
    assert not at.exception
    assert "not a head of" in at.error[0].value


def test_circuit_draws_nodes_above_the_threshold_and_path_patching_edges(populated, monkeypatch):
    from app.data import done_runs, head_metrics

    store, results, _ = populated
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "circuit")
    assert not at.exception
    at.radio[0].set_value("node scores").run()  # path patching's edges could also be drawn as a ranked circuit
    label = at.selectbox[2].value
    threshold = at.slider[0].value
    long = head_metrics(store, done_runs(store))
    scores = long[long["label"] == label]
    expected = set(scores[scores["value"].abs() >= threshold]["name"])
    nodes = at.dataframe[0].value
    senders = set(results["patching.path"].scores["src"])
    assert expected and expected <= set(nodes["name"])
    assert set(nodes["name"]) - expected <= senders | {"L1H0"}  # the rest are edge endpoints
    fig = figures(at)[0]
    edges = [t for t in fig["data"] if t.get("mode") == "lines"]
    assert len(edges) == len(senders) and all(t["text"].split(" -> ")[0] in senders for t in edges)
    assert "stored edge effects" in at.caption[0].value  # found by the declared edge schema, not by method name


def test_prompt_explorer_runs_a_prompt_and_stores_the_results(populated, monkeypatch, toy):
    store, _, toy_path = populated
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    before = len(store.catalog())
    at = app(store, "prompt_explorer")
    at.selectbox[0].set_value(toy_path)
    at.text_area[0].input("3 4 5 6 7 3 4 5")
    at.button[0].click().run()
    assert not at.exception
    figs = figures(at)
    assert len(figs) == 3  # pattern, logit lens, DLA map
    assert array(figs[0]["data"][0]["z"]).shape == (8, 8)
    assert len(store.catalog()) == before + 3


def test_prompt_explorer_reports_bad_input(populated, monkeypatch):
    store, _, toy_path = populated
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "prompt_explorer")
    at.selectbox[0].set_value(toy_path)
    at.text_area[0].input("these are words")
    at.button[0].click().run()
    assert not at.exception
    assert "space-separated token ids" in at.error[0].value


def test_launch_starts_a_background_run_that_lands_in_the_store(tmp_path, monkeypatch, toy_dir):
    from app.launcher import job_status

    store = Store(tmp_path / "launch")
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "launch")
    assert not at.exception, at.exception[0].message
    at.text_area[0].input("n_prompts = 2\nseq_len = 4")
    at.text_input[0].input(str(toy_dir))
    at.selectbox[0].set_value("induction")
    at.button[0].click().run()
    assert not at.exception and "started" in at.success[0].value
    job = next((store.root / "jobs").glob("*.toml"))
    deadline = time.time() + 120
    while job_status(job)[0] == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert job_status(job)[0] == "done"
    runs = store.catalog()
    assert list(runs["method"]) == ["logit_diff"] and list(runs["status"]) == ["done"]
    record = store.job_records()[0]  # the launched run is a job like any other
    assert record["file"] == str(job) and [(u["state"], u["run_id"]) for u in record["units"]] == [("done", runs["run_id"][0])]


def test_jobs_page_shows_a_jobs_units_its_failure_and_the_circuits_it_scored(tmp_path, monkeypatch, toy_dir):
    from workbench.jobs import execute, parse_job

    store = Store(tmp_path / "jobs")
    base = {"model": str(toy_dir), "task": "induction"}
    specs = parse_job({"run": [
        {**base, "task_params": {"n_prompts": 4, "seq_len": 6, "seed": [0, 1]}, "method": "circuit.faithfulness",
         "params": {"discovery": {"method": "discovery.eap"}, "fractions": [0.1, 1.0]}},
        {**base, "task_params": {"n_prompts": 4, "seq_len": 6}, "method": "heads.ablation", "params": {"heads": ["L7H0"]}},
    ]})
    job = execute(specs, store, text="(test)")
    assert [o.state for o in job.outcomes] == ["done", "done", "failed"]
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "jobs")
    assert not at.exception
    assert at.selectbox[0].value == job.job_id
    assert "3 of 3 units finished: failed" in at.get("progress")[0].proto.text
    assert len(at.error) == 1 and "L7H0 is outside the model" in at.error[0].value
    units = at.dataframe[0].value
    assert list(units["state"]) == ["done", "done", "failed"] and list(units["attempts"]) == [1, 1, 1]
    circuits = at.dataframe[1].value
    assert list(circuits["seed"]) == [0, 1] and set(circuits["discovery"]) == {"discovery.eap"}
    for row in circuits.itertuples():
        scores = store.scores(row.faithfulness_run)
        # as MIB reports them: CPR of the signed ranking, CMD of the absolute one
        stored = scores[scores["metric"].isin(["cpr", "cmd"])].set_index(["metric", "ranking"])["value"]
        assert (row.cpr, row.cmd) == pytest.approx((stored[("cpr", "signed")], stored[("cmd", "absolute")]))
        assert store.meta(row.discovery_run)["spec"]["method"] == "discovery.eap"
    sweep = figures(at)[0]
    assert np.allclose(array(sweep["data"][0]["y"]), circuits["cpr"])


def test_launch_refuses_bad_parameters_and_starts_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path / "launch-bad")
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "launch")
    at.text_area[0].input("n_prompts = 2\nno_such_param = 1")
    at.button[0].click().run()
    assert not at.exception
    assert "no_such_param" in at.error[0].value
    assert not (store.root / "jobs").exists()


@pytest.mark.slow
def test_real_browser_renders_the_head_atlas_and_a_head_page(populated, tmp_path, toy):
    """`workbench dashboard` in Debian's chromium: pages render, no exception, screenshots saved."""
    from urllib.parse import quote

    from dashboard_browser import HEATMAP, browser, exceptions, render, served

    store, results, _ = populated
    with served(store.root) as url, browser() as b:
        atlas, _ = render(b, f"{url}/atlas", "Every stored metric per head", HEATMAP)
        assert atlas.locator(HEATMAP).count() >= 1
        assert not exceptions(atlas)
        atlas.screenshot(path=str(tmp_path / "atlas.png"), full_page=True)
        head, _ = render(b, f"{url}/head?model={quote(toy.name, safe='')}&head=L1H2", f"L1H2 of {toy.name}", HEATMAP)
        assert not exceptions(head)
        head.screenshot(path=str(tmp_path / "head.png"), full_page=True)
        circuit, _ = render(b, f"{url}/circuit", "Faithfulness (MIB)", ".js-plotly-plot")
        assert not exceptions(circuit) and circuit.locator(".js-plotly-plot").count() >= 2  # the circuit and its curve
        circuit.screenshot(path=str(tmp_path / "circuit.png"), full_page=True)
    for name in ("atlas", "head", "circuit"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_a_new_per_head_method_reaches_the_atlas_and_head_page_by_its_declaration(tmp_path, monkeypatch, toy):
    """A method registered outside app/ with one declared per-head metric: the atlas maps it and the
    head page ranks it, with no change to the app."""
    from dataclasses import dataclass

    import pandas as pd

    from workbench.methods import _METHODS, Metric, Outputs, register
    from workbench.result import Result

    @dataclass(frozen=True)
    class Params:
        offset: float = 0.0

    @register("test.head_code", Params, "layer * 10 + head", Outputs((Metric("head_code", "layer * 10 + head"),)))
    def head_code(model, task, params, ctx):
        rows = [dict(component="head", layer=lyr, head=h, metric="head_code", value=lyr * 10 + h + params.offset)
                for lyr in range(model.n_layers) for h in range(model.n_heads)]
        return Result(pd.DataFrame(rows))

    try:
        store = Store(tmp_path / "s")
        run_method(toy, build_task(toy, "induction", {"n_prompts": 2, "seq_len": 4}), "test.head_code", {}, store)
        monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
        at = app(store, "head_atlas")
        assert not at.exception
        maps = [f for f in figures(at) if f["data"][0]["type"] == "heatmap" and f["layout"]["title"]["text"] == "head_code"]
        expected = np.array([[lyr * 10 + h for h in range(toy.n_heads)] for lyr in range(toy.n_layers)], dtype=float)
        assert len(maps) == 1 and np.allclose(array(maps[0]["data"][0]["z"]), expected)
        page = app(store, "head_detail", model=toy.name, head="L1H2")
        scores = page.dataframe[0].value
        row = scores[scores["metric"] == "head_code"]
        assert row["value"].item() == 12 and row["rank"].item() == 1 + sum(v > 12 for v in expected.flatten())
    finally:
        _METHODS.pop("test.head_code")


def test_circuit_page_draws_a_discovered_circuit_with_its_faithfulness_curve(tmp_path, monkeypatch, toy):
    store = Store(tmp_path / "discovery")
    task = build_task(toy, "induction", {"n_prompts": 4, "seq_len": 6})
    found = run_method(toy, task, "discovery.eap_ig", {"steps": 2}, store)
    curve = run_method(toy, task, "circuit.faithfulness", {"discovery": {"method": "discovery.eap_ig", "params": {"steps": 2}}}, store)
    n_edges = len(found.metric("eap_ig"))
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "circuit")
    assert not at.exception and at.radio[0].value == "a discovery run"
    at.slider[0].set_value(n_edges).run()  # every edge: nothing to prune
    lines = [t for t in figures(at)[0]["data"] if t.get("mode") == "lines"]
    assert len(lines) == n_edges
    assert float(at.metric[0].value) == pytest.approx(curve.metric("cpr").set_index("ranking")["value"]["signed"], abs=1e-3)
    assert float(at.metric[1].value) == pytest.approx(curve.metric("cmd").set_index("ranking")["value"]["absolute"], abs=1e-3)
    marker = [s for s in figures(at)[1]["layout"]["shapes"] if s.get("line", {}).get("dash") == "dash"][0]
    assert marker["x0"] == pytest.approx(1.0)  # the circuit on screen is marked on the curve
    at.slider[0].set_value(3).run()  # fewer edges: the graph updates (pruning may keep fewer still)
    assert len([t for t in figures(at)[0]["data"] if t.get("mode") == "lines"]) <= 3


def test_head_atlas_draws_a_masking_curve_with_its_bands_from_the_stored_run(tmp_path, monkeypatch):
    from toy_circuits import make_induction_toy, needle_task
    from workbench.models import from_hooked_transformer

    store = Store(tmp_path / "store")
    wired = from_hooked_transformer(make_induction_toy(), "wired-induction")
    result = run_method(wired, needle_task(), "retrieval.masking", {"max_new_tokens": 6, "ks": [1, 2], "n_random": 2}, store)
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = app(store, "head_atlas")
    assert not at.exception
    fig = next(f for f in figures(at) if f["layout"]["title"]["text"].startswith("Needle accuracy with heads masked"))
    lines = {t["name"]: t for t in fig["data"] if t.get("mode") == "lines+markers"}
    stored = result.metric("masking_curve").set_index(["masked", "k"])["value"]
    top, rand = lines["top-K retrieval heads"], lines["K random non-retrieval heads (mean over draws)"]
    assert list(array(top["x"])) == [1, 2] and list(array(top["y"])) == [stored[("retrieval", 1)], stored[("retrieval", 2)]]
    assert list(array(rand["y"])) == [stored[("random", 1)], stored[("random", 2)]]
    assert list(array(top["y"])) == [0.0, 0.0]  # the wired copying head is always the top one
    dots = next(t for t in fig["data"] if t.get("name") == "one random draw")
    assert len(array(dots["y"])) == 4
    assert any(s.get("y0") == 1.0 for s in fig["layout"]["shapes"])  # the unmasked baseline
