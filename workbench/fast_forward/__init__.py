"""The fast forward: how every method runs TransformerLens's HookedTransformer faster without
changing what it computes or what a hook sees.

- `attention`: fused attention (PyTorch's scaled_dot_product_attention) inside `sdpa_attention`,
  with the fused blocks (`block`) and norms (`norm`) it brings;
- `joint_weights`: each layer's q/k/v (and a gated MLP's gate/in) weights as views of one matrix;
- `attention_pass`: attention patterns computed in blocks of query rows, for pattern-reading scores;
- `own_hooks`: temporary hooks that remove only their own handles;
- `replacements`: the one way a caller substitutes a module's computation (a circuit run's
  per-head q/k/v inputs, an intervention) so that every path above honours it.

The contract a caller may rely on is written in docs/architecture.md ("The fast forward").
"""
