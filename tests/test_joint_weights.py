"""Loaded models keep each layer's query, key and value weights (and a gated MLP's gate and input
weights) as views of one matrix, which fused forwards multiply by once. The parameters keep their
names and values and the forward its results; a parameter replaced, cast, copied or taking
gradients sends the forward back to the separate products; hooks registered through torch itself
still fire where fused forwards skip `nn.Module`'s call machinery."""

import contextlib
import copy

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

import workbench.fast_forward.attention as sdpa
from conftest import DispatchedOps, make_toy_tl
from workbench.models import linear_layout, weights_hash
from workbench.fast_forward.joint_weights import joint_weights

GATED = dict(n_layers=3, seed=5, attn_only=False, gated_mlp=True, act_fn="silu", normalization_type="RMS",
             n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
LAYERNORM = dict(n_layers=3, seed=5, attn_only=False, normalization_type="LN")
SHAPES = pytest.mark.parametrize("shape", [GATED, LAYERNORM], ids=["gated-gqa", "layernorm"])


def toy(shape):
    """A toy with random biases everywhere (TransformerLens initialises them to 0), so a bias
    joined in the wrong order shows."""
    tl = make_toy_tl(**shape)
    g = torch.Generator().manual_seed(1)
    for name, p in tl.named_parameters():
        if name.split(".")[-1] in ("b_Q", "b_K", "b_V", "_b_K", "_b_V", "b_in"):
            p.data.copy_(torch.randn(p.shape, generator=g))
    return tl


def tokens(tl):
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)).to(tl.cfg.device)


def fused(tl, x):
    with torch.no_grad(), sdpa.sdpa_attention(tl):
        return tl(x)


def same_products(a, b) -> bool:
    """Bit for bit on the CPU; CUDA picks a product's kernel by its operands' strides, which joining
    changes, so there to float32 rounding."""
    return torch.equal(a, b) if a.device.type == "cpu" else torch.allclose(a, b, atol=1e-5, rtol=0)


def joined(tl) -> list[bool]:
    return [joint_weights(m, grad=False) is not None for b in tl.blocks for m in (b.attn, b.mlp)]


@SHAPES
def test_joined_parameters_keep_their_names_values_and_transformer_lens_forward(shape):
    tl = toy(shape)
    before, x = {k: v.clone() for k, v in tl.state_dict().items()}, tokens(tl)
    digest, plain = weights_hash(tl), tl(x)
    linear_layout(tl)
    after = tl.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert weights_hash(tl) == digest and same_products(tl(x), plain)  # TransformerLens's own products
    attn = tl.blocks[0].attn
    names = ("W_Q", "_W_K", "_W_V", "b_Q", "_b_K", "_b_V") if shape is GATED else ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")
    assert len({attn._parameters[n].untyped_storage().data_ptr() for n in names[:3]}) == 1
    assert joined(tl) == [True, shape is GATED] * tl.cfg.n_layers
    linear_layout(tl)  # again: nothing to do
    assert same_products(tl(x), plain)


@SHAPES
def test_one_product_computes_queries_keys_and_values_and_one_the_gate_and_input(shape):
    """Against the same fused forward on separate weights: equal logits, and two fewer matrix
    products a layer (three with a gated MLP)."""
    tl = toy(shape)
    separate = copy.deepcopy(tl)
    linear_layout(tl)
    x = tokens(tl)

    def products(model):
        fused(model, x)  # the first forward keeps the rotary tables it needs
        with torch.no_grad(), sdpa.sdpa_attention(model), DispatchedOps() as ops:
            logits = model(x)
        return logits, sum(ops.names.count(name) for name in ("mm", "addmm", "bmm"))

    (ours, n_ours), (theirs, n_theirs) = products(tl), products(separate)
    with torch.no_grad():
        reference = separate(x)
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(ours, reference, atol=1e-5)
    assert n_theirs - n_ours == (3 if shape is GATED else 2) * tl.cfg.n_layers


def test_a_replaced_cast_or_copied_parameter_goes_back_to_the_separate_products():
    tl = toy(GATED)
    linear_layout(tl)
    x = tokens(tl)
    attn, mlp = tl.blocks[1].attn, tl.blocks[2].mlp
    with torch.no_grad():
        attn._W_K.mul_(1.5)  # written in place: still a view, and the joint product reads it
        mlp.W_in.add_(0.1)
    assert joined(tl) == [True] * 6
    assert torch.allclose(fused(tl, x), tl(x), atol=1e-5)
    copied = copy.deepcopy(tl)
    assert joined(copied) == [False] * 6 and joined(tl) == [True] * 6
    assert torch.allclose(fused(copied, x), tl(x), atol=1e-5)
    attn.W_Q = torch.nn.Parameter(attn.W_Q.detach() * -1.0, requires_grad=False)  # replaced
    mlp.W_gate = torch.nn.Parameter(mlp.W_gate.detach() * 2.0, requires_grad=False)
    with torch.no_grad():
        expected = tl(x)
    assert not torch.allclose(expected, copied(x), atol=1e-2)  # the replacement matters
    assert torch.allclose(fused(tl, x), expected, atol=1e-5)
    assert joined(tl) == [True, True, False, True, True, False]
    tl.to(torch.float64)  # cast: every parameter's data replaced
    assert joined(tl) == [False] * 6
    with torch.no_grad():
        assert torch.allclose(fused(tl, x), tl(x), atol=1e-9)


def test_a_parameter_taking_gradients_gets_transformer_lens_gradient():
    """The joint matrix carries no gradient to the parameters, so while one takes gradients the
    separate products run; activations' gradients flow through the joint product either way."""
    tl = toy(GATED)
    linear_layout(tl)
    x, attn = tokens(tl), tl.blocks[1].attn
    for p in tl.parameters():
        p.requires_grad_(False)

    def grads(use_fused):
        kept = {}

        def leaf(act, hook):
            kept["resid"] = act.detach().requires_grad_(True)
            return kept["resid"]

        attn.W_Q.grad = None
        with sdpa.sdpa_attention(tl) if use_fused else contextlib.nullcontext():
            tl.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pre", leaf)])[:, -1, 0].sum().backward()
        return kept["resid"].grad, attn.W_Q.grad

    (resid_ours, no_grad), (resid_theirs, _) = grads(True), grads(False)
    assert no_grad is None and torch.allclose(resid_ours, resid_theirs, atol=1e-5)
    attn.W_Q.requires_grad_(True)
    (_, w_ours), (_, w_theirs) = grads(True), grads(False)
    assert w_ours is not None and w_ours.abs().sum() > 0 and torch.allclose(w_ours, w_theirs, atol=1e-5)


@SHAPES
def test_hooks_registered_through_torch_fire_in_fused_forwards(shape):
    """Fused forwards call a hook point or submodule without `nn.Module`'s call machinery only
    where torch would run its forward alone: a hook registered on the module, or one on every
    module, still runs and still changes the result as in TransformerLens's forward."""
    tl = toy(shape)
    linear_layout(tl)
    x = tokens(tl)
    with torch.no_grad():
        clean = tl(x)
    scale = lambda module, args, out: out * 0.5
    for point in (tl.blocks[1].hook_resid_mid, tl.blocks[0].attn.hook_q, tl.blocks[2].ln2):
        handle = point.register_forward_hook(scale)
        with torch.no_grad():
            expected = tl(x)
        try:
            assert not torch.allclose(expected, clean, atol=1e-3)
            assert torch.allclose(fused(tl, x), expected, atol=1e-5)
        finally:
            handle.remove()
    z = tl.blocks[0].attn.hook_z
    handle = register_module_forward_hook(lambda module, args, out: out * 0.0 if module is z else None)
    try:
        with torch.no_grad():
            expected = tl(x)
        assert not torch.allclose(expected, clean, atol=1e-3) and torch.allclose(fused(tl, x), expected, atol=1e-5)
    finally:
        handle.remove()
    assert torch.allclose(fused(tl, x), clean, atol=1e-5)
