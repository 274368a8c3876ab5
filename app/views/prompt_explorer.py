"""Prompt explorer: type a prompt (and optionally a corrupted one and the answers), run it live on
a model, and see every head's attention, the logit lens and the direct logit attribution. The
results go to the store like any other run, so a prompt seen once reloads without the model."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from app import common, data
from app.figures import head_heatmap, pattern_figure
from workbench.errors import WorkbenchError
from workbench.runner import run_method

METHODS = (("attention.patterns", {"n_prompts": 1, "max_tokens": 256}), ("attribution.logit_lens", {}),
           ("attribution.dla", {}))


@st.cache_resource(show_spinner=False, max_entries=2)
def load(name: str):
    from workbench.models import load_model

    return load_model(name)


store = common.store()
root = str(store.root)
st.title("Prompt explorer")
runs = common.catalog(root)
known = sorted(set(runs["model"].dropna()) | {"smollm2-135m"}) if not runs.empty else ["smollm2-135m"]
with st.form("prompt"):
    model_name = st.selectbox("Model", known, index=known.index(st.query_params.get("model", "smollm2-135m"))
                              if st.query_params.get("model", "smollm2-135m") in known else 0,
                              accept_new_options=True)
    clean = st.text_area("Prompt", value="When Mary and John went to the store, John gave a drink to", height=80)
    corrupted = st.text_input("Corrupted prompt (optional, same token length)")
    c1, c2 = st.columns(2)
    answer = c1.text_input("Answer token (optional; default: the model's top prediction)")
    wrong = c2.text_input("Wrong token (optional; default: its runner-up)")
    go = st.form_submit_button("Run", type="primary")

if go:
    try:
        with st.spinner(f"loading {model_name} and running the prompt..."):
            from workbench.tasks.prompt import prompt_task

            model = load(model_name)
            task = prompt_task(model, clean, corrupted or None, answer or None, wrong or None)
            results = {m: run_method(model, task, m, p, store) for m, p in METHODS}
    except WorkbenchError as e:
        st.error(str(e))
        st.stop()
    common.catalog.clear()
    st.session_state["explored"] = {m: r.run_id for m, r in results.items()}
    st.session_state["explored_model"] = model_name

if "explored" not in st.session_state:
    st.info("Type a prompt and press Run. The model loads once per session; results are stored.")
    st.stop()

ids = st.session_state["explored"]
model_name = st.session_state["explored_model"]
meta = common.run_meta(root, ids["attention.patterns"])
tokens = meta["tokens"][0]
pattern = common.run_tensor(root, ids["attention.patterns"], "pattern")[0]
n_layers, n_heads = pattern.shape[0], pattern.shape[1]
dla_scores = common.run_scores(root, ids["attribution.dla"])
answer_row = dla_scores[(dla_scores["metric"] == "logit_diff") & dla_scores["prompt"].isna()]
st.caption(f"{len(tokens)} tokens; logit difference (answer - wrong) {answer_row['value'].iloc[0]:.3f}"
           if not answer_row.empty else f"{len(tokens)} tokens")

c1, c2 = st.columns(2)
layer = c1.number_input("Layer", 0, n_layers - 1, value=n_layers - 1)
head = c2.number_input("Head", 0, n_heads - 1, value=0)
st.plotly_chart(pattern_figure(pattern[layer, head], tokens, f"L{layer}H{head}"), width="stretch")

lens = common.run_scores(root, ids["attribution.logit_lens"])
lens = lens[lens["prompt"].isna() & (lens["metric"] == "logit_lens_logit_diff")]
lens = lens.assign(stage=lens["layer"] + (lens["hook"] == "resid_post").astype(int))
st.plotly_chart(px.line(lens, x="stage", y="value", markers=True, title="Logit lens: logit difference after each layer",
                        labels={"stage": "residual stream before layer (last = after the final layer)", "value": "logit difference"}),
                width="stretch")
heads = data.head_rows(dla_scores, ["dla"])
if not heads.empty:
    grid = heads.pivot_table(index="layer", columns="head", values="value").reindex(index=range(n_layers), columns=range(n_heads))
    st.plotly_chart(head_heatmap(grid, "Direct logit attribution per head"), width="stretch")
