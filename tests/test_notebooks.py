"""Every notebook runs top to bottom against a store the demo filled, as a user's notebook meets
their store, and leaves the runs it is about in that store."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


# what each notebook computes or reads: its runs must be in the store it was given afterwards
USES = {
    "00_quickstart.ipynb": {"logit_diff"},
    "01_ioi_circuit.ipynb": {"logit_diff", "patching.attn_head", "attribution.dla", "patching.attribution",
                             "attribution.logit_lens", "attribution.head_sources", "patching.path", "patching.mlp_out"},
    "02_retrieval_heads.ipynb": {"retrieval.score", "retrieval.masking", "heads.sinks", "heads.detect"},
    "03_attention_saes.ipynb": {"sae.train", "sae.dfa"},
    "04_circuit_discovery.ipynb": {"discovery.eap_ig", "discovery.eap", "discovery.nodes", "circuit.faithfulness",
                                   "circuit.overlap", "patching.attn_head"},
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, demo_store):
    from workbench.store import Store

    store, _ = demo_store
    monkeypatch.setenv("WORKBENCH_HOME", str(store))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert USES[path.name] <= set(Store(store).catalog(status="done")["method"])


def test_there_is_a_quickstart():
    assert any(p.name == "00_quickstart.ipynb" for p in NOTEBOOKS)
