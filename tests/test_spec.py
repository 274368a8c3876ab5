"""Run specs are parsed once, typed and serialisable; method declarations are checked against what
methods write; every method's defaults work on its natural task."""

import json

import pandas as pd
import pytest

from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, all_methods
from workbench.params import defaults
from workbench.result import Result
from workbench.runner import check_outputs, run
from workbench.spec import Need, RunSpec, TaskSpec
from workbench.store import Store

REQUIRED = {"patching.path": "needs parameter(s) ['receivers']", "sae.load": "give either path",
            "circuit.compare": "give the reference circuit either"}


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_parses_its_defaults_on_its_natural_task_and_round_trips(name):
    method = all_methods()[name]
    if name in REQUIRED:  # a parameter without a default says so, once
        with pytest.raises(WorkbenchError, match=REQUIRED[name].replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            RunSpec.parse("smollm2-135m", name, None, method.task, method.task_params)
        return
    spec = RunSpec.parse("smollm2-135m", name, None, method.task, method.task_params)
    assert spec.params == method.params(**{})  # the defaults, as the dataclass holds them
    text = json.dumps(spec.to_json())
    again = RunSpec.from_json(json.loads(text))
    assert again == spec and json.dumps(again.to_json()) == text
    assert set(defaults(method.params)) == set(spec.to_json()["params"])


def test_a_json_round_trip_gives_the_same_store_key(toy_dir, tmp_path):
    store = Store(tmp_path / "s")
    spec = RunSpec.parse(str(toy_dir), "heads.detect", {"batch_size": 3}, "induction", {"n_prompts": 4, "seq_len": 6})
    first = run(spec, store)
    again = run(RunSpec.from_json(json.loads(json.dumps(spec.to_json()))), store)
    assert again.meta["cached"] and again.meta["key"] == first.meta["key"]


def test_plan_names_the_keys_a_run_writes_before_computing_anything(toy_dir, tmp_path):
    from workbench.runner import plan

    store = Store(tmp_path / "s")
    spec = RunSpec.parse(str(toy_dir), "circuit.faithfulness", {"discovery": {"method": "discovery.eap"}, "fractions": [1.0]},
                         "induction", {"n_prompts": 4, "seq_len": 6})
    keys = [key for key, _ in plan(spec)]
    assert len(keys) == 2 and not any(store.has(k) for k in keys)
    result = run(spec, store)
    assert result.meta["key"] == keys[1] and result.meta["spec"]["needs"] == {"discovery": keys[0]}
    assert store.meta(keys[0])["spec"]["method"] == "discovery.eap"


def test_values_a_job_file_alone_shows_wrong_are_refused_at_parse():
    bad = [("patching.attn_head", {"metric": "accuracy"}, "should be one of 'logit_diff'"),
           ("patching.resid", {"direction": "sideways"}, "should be one of 'denoise', 'noise'"),
           ("patching.attn_head", {"chunk_tokens": 0}, "chunk_tokens = 0 must be at least 1"),
           ("patching.attn_head", {"activation": "zz"}, "should be one of 'z'"),
           ("heads.ablation", {"ablation": "shuffle"}, "should be one of 'zero', 'mean', 'resample'"),
           ("heads.sinks", {"threshold": 0.0}, "give a value in (0, 1)"),
           ("retrieval.masking", {"mask": "erase"}, "should be one of 'query'"),
           ("retrieval.masking", {"n_random": 0}, "n_random = 0 must be at least 1"),
           ("patching.attribution", {"activations": ["k_per_query"]}, "activations must be"),
           ("attribution.logit_lens", {"top_k": 0}, "top_k = 0"),
           ("sae.train", {"layer": -1}, "layer = -1"),
           ("sae.dfa", {"sae": {"method": "heads.detect"}}, "holds no SAE"),
           ("patching.path", {"receivers": ["L1H0"], "senders": ["X"]}, "'X' is not a head name")]
    for name, params, message in bad:
        with pytest.raises(WorkbenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
            RunSpec.parse("smollm2-135m", name, params, all_methods()[name].task)


def test_a_need_names_another_run_by_spec():
    need = Need.from_json({"method": "sae.train", "params": {"layer": 3, "architecture": "topk", "k": 8},
                           "task": "corpus", "task_params": {"n_prompts": 40}})
    assert need.params.k == 8 and need.task == TaskSpec.parse("corpus", {"n_prompts": 40})
    assert Need.from_json(json.loads(json.dumps(need.to_json()))) == need
    spec = RunSpec.parse("smollm2-135m", "sae.train", {"layer": 3, "architecture": "topk", "k": 8}, "corpus", {"n_prompts": 40})
    assert Need.of(spec) == need


def test_results_must_match_their_declaration():
    outputs = Outputs((Metric("score", "a per-head score"),))
    good = Result(pd.DataFrame({"component": "head", "layer": [0, 1], "head": [1, 0], "metric": "score", "value": 1.0}))
    check_outputs("m", good, outputs)
    wrong = [
        (pd.DataFrame({"component": "head", "layer": [0], "head": [1], "metric": "other", "value": 1.0}), "undeclared metric"),
        (pd.DataFrame({"component": "mlp", "layer": [0], "metric": "score", "value": 1.0}), "has components"),
        (pd.DataFrame({"component": "head", "layer": [0], "head": [1], "position": [3], "metric": "score", "value": 1.0}),
         "fills 'position'"),
        (pd.DataFrame({"component": "head", "layer": [0], "metric": "score", "value": 1.0}), "index column 'head'"),
    ]
    for frame, message in wrong:
        with pytest.raises(RuntimeError, match=message):
            check_outputs("m", Result(frame), outputs)
