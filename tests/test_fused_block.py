"""Within fused attention a block and a gated MLP run without TransformerLens's idle additions (`+ 0.0`
on the query and key inputs, `b_in` in a kernel of its own): every hook point fires in
TransformerLens's order with its values, a configuration it does not cover keeps TransformerLens's
forward, and a forward dispatches three fewer operators a layer."""

import pytest
import torch

import workbench.fast_forward.attention as sdpa
from workbench.fast_forward.own_hooks import own_hooks
from conftest import DispatchedOps, make_toy_tl

GATED = dict(n_layers=3, seed=5, attn_only=False, gated_mlp=True, act_fn="silu", normalization_type="RMS",
             n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
LAYERNORM = dict(n_layers=3, seed=5, attn_only=False, normalization_type="LN")


def recorded(tl, tokens):
    """Logits and every block hook point's (name, value) in firing order; norms' and patterns'
    hooks aside, so the norms stay fused and the attention too."""
    seen = []

    def keep(act, hook):
        seen.append((hook.name, act.detach().clone()))

    inside = lambda n: n.startswith("blocks.") and not any(s in n for s in (".ln", "hook_pattern", "hook_attn_scores"))
    with torch.no_grad(), own_hooks(tl, [(inside, keep)]):
        return tl(tokens), seen


@pytest.mark.parametrize("switch", [None, "mlp_in", "split_qkv"])
@pytest.mark.parametrize("shape", [GATED, LAYERNORM], ids=["gated", "layernorm"])
def test_every_hook_point_fires_in_transformer_lens_order_with_its_values(shape, switch):
    tl = make_toy_tl(**shape)
    gated = shape is GATED
    for block in tl.blocks:  # a bias for the gated MLP's addcmul to add (TransformerLens initialises it to 0)
        block.mlp.b_in.data.copy_(torch.randn(block.mlp.b_in.shape, generator=torch.Generator().manual_seed(block.attn.layer_id)))
    if switch == "mlp_in":
        tl.set_use_hook_mlp_in(True)
    if switch == "split_qkv":  # checked at each call: TransformerLens's own block
        tl.set_use_split_qkv_input(True)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)).to(tl.cfg.device)
    expected, seen_expected = recorded(tl, tokens)
    with sdpa.sdpa_attention(tl):
        assert all("forward" in block.__dict__ and ("forward" in block.mlp.__dict__) == gated for block in tl.blocks)
        logits, seen = recorded(tl, tokens)
    assert [name for name, _ in seen] == [name for name, _ in seen_expected]
    assert any(name.endswith("hook_mlp_in") for name, _ in seen) == (switch == "mlp_in")
    assert any(name.endswith("hook_q_input") for name, _ in seen) == (switch == "split_qkv")
    assert all(torch.allclose(a, b, atol=1e-5) for (_, a), (_, b) in zip(seen, seen_expected))
    assert torch.allclose(logits, expected, atol=1e-5)


def test_a_forward_dispatches_three_fewer_operators_a_layer(monkeypatch):
    """Two additions of 0.0 and the MLP's separate bias addition go; the multiplication becomes an
    addcmul. Against the same fused forward with TransformerLens's block and MLP."""
    tl = make_toy_tl(**GATED)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)).to(tl.cfg.device)

    real = torch.nn.functional.scaled_dot_product_attention

    def ops():
        """Outside the attention kernel, whose operators depend on the device (CUDA's math path)."""
        with torch.no_grad(), sdpa.sdpa_attention(tl):
            tl(tokens)  # the first forward keeps the rotary table it needs
            with DispatchedOps() as counted:
                def marked(*args, **kwargs):
                    counted.names.append("<attention>")
                    z = real(*args, **kwargs)
                    counted.names.append("</attention>")
                    return z

                monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", marked)
                tl(tokens)
                monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)
        names, inside = [], False
        for name in counted.names:
            inside = name == "<attention>" or (inside and name != "</attention>")
            names += [] if inside or name == "</attention>" else [name]
        assert counted.names.count("<attention>") == tl.cfg.n_layers
        return names

    ours = ops()
    monkeypatch.setattr(sdpa, "fused_block", lambda block: None)
    monkeypatch.setattr(sdpa, "fused_gated_mlp", lambda mlp: None)
    theirs = ops()
    n = tl.cfg.n_layers
    assert len(theirs) - len(ours) == 3 * n
    assert (theirs.count("add") - ours.count("add"), theirs.count("mul") - ours.count("mul")) == (3 * n, n)
    assert ours.count("addcmul") - theirs.count("addcmul") == n
    assert ours.count("add") == 2 * n  # what is left: each block's two residual additions


def test_a_parallel_block_keeps_transformer_lens_forward():
    tl = make_toy_tl(**{**LAYERNORM, "parallel_attn_mlp": True})
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)).to(tl.cfg.device)
    expected, seen_expected = recorded(tl, tokens)
    with sdpa.sdpa_attention(tl):
        assert not any("forward" in block.__dict__ for block in tl.blocks)
        logits, seen = recorded(tl, tokens)
    assert [name for name, _ in seen] == [name for name, _ in seen_expected] and torch.allclose(logits, expected, atol=1e-5)
