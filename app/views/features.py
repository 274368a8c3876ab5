"""Features of a stored attention-output SAE (deep link: `features?model=NAME&sae=RUN&feature=N`):
the SAE's evaluation, a head's top features, and for one feature its top-activating examples with
highlighted tokens, activation histogram, head attribution and direct logit effects."""

from __future__ import annotations

import streamlit as st

from app import common, data
from app.figures import feature_histogram_figure, head_attribution_figure, highlighted_tokens_html, logit_effect_figure
from workbench.nodes import head_name

EXAMPLE_TENSORS = ["example_max", "example_tokens", "example_acts", "example_prompt", "example_position",
                   "activation_histogram", "histogram_edges", "head_attribution",
                   "logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values"]


@st.cache_data(show_spinner=False, max_entries=16)
def sae_tensors(root: str, run_id: str) -> dict:
    return data.run_tensors(common.Store(root), run_id, EXAMPLE_TENSORS)


store, root, model, runs = common.model_page("Features")
saes = data.sae_runs(runs)
if saes.empty:
    st.info("No SAEs stored for this model. Train one with `workbench run examples/attention_saes.toml` "
            "(method `sae.train`), or bring a SAELens SAE in with `sae.load`.")
    st.stop()

labels = {r.run_id: f"L{common.run_meta(root, r.run_id)['layer']} · {data.run_label(r._asdict())} · {r.run_id}"
          for r in saes.itertuples()}
ids = list(labels)
wanted = st.query_params.get("sae")
run_id = st.selectbox("SAE", ids, index=ids.index(wanted) if wanted in ids else 0, format_func=labels.get)
st.query_params["sae"] = run_id
meta = common.run_meta(root, run_id)
scores = common.run_scores(root, run_id)
layer, d_sae = int(meta["layer"]), int(meta["d_sae"])

model_rows = scores[scores["component"] == "model"].set_index("metric")["value"]
shown = [("L0", "sae_l0"), ("explained variance", "sae_explained_variance"), ("CE loss recovered", "ce_loss_recovered"),
         ("dead share", "sae_dead_share"), ("polysemantic heads", "sae_polysemantic_head_share")]
for col, (name, metric) in zip(st.columns(len(shown)), shown):
    if metric in model_rows:
        col.metric(name, f"{model_rows[metric]:.3g}")
st.caption(f"{meta.get('architecture')} SAE on `{meta['hook']}`, {d_sae} features; evaluated on "
           f"{int(model_rows.get('sae_eval_tokens', 0))} held-out tokens.")

# -- a head's features ----------------------------------------------------------------------
n_heads = int(meta["model_shape"]["n_heads"])
names = [head_name(layer, h) for h in range(n_heads)]
asked = st.query_params.get("head")
head = st.selectbox("Features of head", range(n_heads), format_func=names.__getitem__,
                    index=names.index(asked) if asked in names else 0)
st.query_params["head"] = names[head]
top = data.head_top_features(scores, head)
st.dataframe(top, hide_index=True, width="stretch")

# -- one feature ----------------------------------------------------------------------------
default = int(st.query_params.get("feature", top["feature"].iloc[0] if len(top) else 0))
feature = int(st.number_input("Feature", min_value=0, max_value=d_sae - 1, value=min(max(default, 0), d_sae - 1)))
st.query_params["feature"] = str(feature)
t = sae_tensors(root, run_id)
strings = meta.get("token_strings", {})

left, right = st.columns(2)
left.plotly_chart(head_attribution_figure(t["head_attribution"][feature], layer, f"feature {feature}: head attribution"),
                  width="stretch")
if "activation_histogram" in t:
    right.plotly_chart(feature_histogram_figure(t["activation_histogram"][feature], t["histogram_edges"],
                                                f"feature {feature}: activations on the training corpus"), width="stretch")

st.subheader(f"Top-activating examples of feature {feature}")
examples = data.feature_examples(t, strings, feature) if "example_max" in t else []
if not examples:
    st.info("No stored examples: this feature never fired on the cached corpus, or the SAE came from `sae.load` "
            "(examples come from the feature pass of `sae.train`).")
for ex in examples:
    st.markdown(f"**{ex['max']:.3f}** · prompt {ex['prompt']}, position {ex['position']}"
                + highlighted_tokens_html(ex["tokens"], ex["acts"], examples[0]["max"]), unsafe_allow_html=True)

if "logit_top_ids" in t:
    left, right = st.columns(2)
    for col, which, title in ((left, "top", "promotes"), (right, "bottom", "suppresses")):
        tokens = [strings.get(str(int(i)), f"<{int(i)}>") for i in t[f"logit_{which}_ids"][feature]]
        col.plotly_chart(logit_effect_figure(tokens, t[f"logit_{which}_values"][feature],
                                             f"feature {feature} {title} (W_dec · W_O · W_U)"), width="stretch")
