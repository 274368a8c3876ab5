"""What an SAE run declares it writes (shared by `sae.train` and `sae.load`): the SAE itself as an
artifact other runs read, its evaluation, per-feature head attribution and, for trained SAEs,
the feature pass over the activation cache."""

from __future__ import annotations

from workbench.methods import Metric, Outputs

LAYER = ("layer",)
FEATURE = ("layer", "feature")

EVALUATION = {
    "sae_l0": "mean number of active features per held-out token",
    "sae_mse": "mean squared reconstruction error per input dimension",
    "sae_explained_variance": "share of the variance of hook_z the reconstruction explains",
    "sae_dead_share": "share of features that never fire on the held-out tokens",
    "sae_dense_share": "share of features firing on more than 10% of held-out tokens",
    "sae_eval_tokens": "held-out tokens evaluated",
    "ce_clean": "next-token loss of the model",
    "ce_sae": "next-token loss with the SAE's reconstruction spliced into hook_z",
    "ce_zero_ablation": "next-token loss with hook_z zeroed",
    "ce_loss_recovered": "(ce_zero_ablation - ce_sae) / (ce_zero_ablation - ce_clean)",
    "kl_sae": "mean KL(clean || SAE spliced in) per token",
    "kl_zero_ablation": "mean KL(clean || hook_z zeroed) per token",
    "kl_recovered": "1 - kl_sae / kl_zero_ablation",
}
SAE_TENSORS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",),
               "threshold": ("d_sae",), "head_attribution": ("d_sae", "head")}

BASE = tuple(Metric(name, meaning, "model", LAYER, "summary") for name, meaning in EVALUATION.items()) + (
    Metric("head_attribution", "share of a feature's decoder norm that writes through each head (sums to 1 per feature)",
           "sae_feature", ("layer", "head", "feature"), "detail"),
)
FEATURE_PASS = (
    Metric("feature_frequency", "share of cached training tokens the feature fires on", "sae_feature", FEATURE, "detail"),
    Metric("feature_mean_activation", "mean activation when firing", "sae_feature", FEATURE, "detail"),
    Metric("feature_max_activation", "largest activation over the cache", "sae_feature", FEATURE, "detail"),
    Metric("sae_head_features", "the head's top features that were classified", "head", ("layer", "head")),
    Metric("sae_head_families", "how many feature families (induction, local, long_range) the head's top features span",
           "head", ("layer", "head")),
    Metric("sae_polysemantic", "1 when the head's top features span at least two families", "head", ("layer", "head")),
    Metric("family_induction_share", "share of the feature's head attribution from induction sources on its top example",
           "sae_feature", ("layer", "head", "feature", "family"), "detail"),
    Metric("family_local_share", "share from the last 4 tokens on its top example", "sae_feature",
           ("layer", "head", "feature", "family"), "detail"),
    Metric("sae_polysemantic_head_share", "share of judged heads that are polysemantic", "model", LAYER, "summary"),
    Metric("sae_feature_pass_tokens", "cached tokens the feature pass read", "model", LAYER, "summary"),
)
FEATURE_TENSORS = {
    "activation_histogram": ("d_sae", "bin"), "histogram_edges": ("edge",), "example_prompt": ("d_sae", "example"),
    "example_position": ("d_sae", "example"), "example_tokens": ("d_sae", "example", "context"),
    "example_acts": ("d_sae", "example", "context"), "example_max": ("d_sae", "example"),
    "logit_top_ids": ("d_sae", "k"), "logit_top_values": ("d_sae", "k"), "logit_bottom_ids": ("d_sae", "k"),
    "logit_bottom_values": ("d_sae", "k"),
}
LOADED_SAE = Outputs(BASE, SAE_TENSORS, artifact="sae")
TRAINED_SAE = Outputs(BASE + FEATURE_PASS, {**SAE_TENSORS, **FEATURE_TENSORS}, artifact="sae")
