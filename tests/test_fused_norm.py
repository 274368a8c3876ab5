"""PyTorch's norms stand in for TransformerLens's four kinds with the same values and gradients, in
float32 and bfloat16, inside fused attention for every block's norms and the final one, and step
aside for a norm whose scale or output a hook reads."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from workbench.fast_forward.norm import fused_norm
from workbench.fast_forward.own_hooks import own_hooks
from workbench.fast_forward.attention import sdpa_attention
from conftest import make_toy_tl

KINDS = ["LN", "LNPre", "RMS", "RMSPre"]


class NormCalls(TorchFunctionMode):
    """Counts calls of PyTorch's own norms."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func in (torch.nn.functional.rms_norm, torch.nn.functional.layer_norm)
        return func(*args, **(kwargs or {}))


def _model(kind: str, dtype=torch.float32):
    tl = make_toy_tl(n_layers=3, seed=5, attn_only=False, normalization_type=kind, dtype=dtype)
    with torch.no_grad():  # weights away from their initial ones and zeros, so a dropped weight or bias shows
        for name, param in tl.named_parameters():
            if name.endswith(("ln1.w", "ln2.w", "ln_final.w", "ln1.b", "ln2.b", "ln_final.b")):
                param.copy_(torch.randn_like(param))
    return tl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_a_fused_norm_equals_transformer_lens_norm_in_value_and_gradient(kind, dtype):
    ln = _model(kind, dtype).blocks[1].ln2
    x = (3 * torch.randn(2, 7, ln.cfg.d_model, generator=torch.Generator().manual_seed(0)) + 0.5).to(ln.cfg.device, dtype)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, expected = fused_norm(ln, ln.forward)(x_ours), ln(x_ref)
    assert ours.dtype == expected.dtype == dtype
    weight = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(ln.cfg.device, dtype)
    (ours * weight).sum().backward()
    (expected * weight).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # bfloat16: a unit or two in the last place
    torch.testing.assert_close(ours, expected, **tol)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_fused_attention_every_norm_is_pytorchs_and_the_forward_is_transformer_lens(kind):
    tl = _model(kind)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2)).to(tl.cfg.device)
    with torch.no_grad():
        expected = tl(tokens)
        with sdpa_attention(tl), NormCalls() as calls:
            logits = tl(tokens)
    assert calls.n == 2 * tl.cfg.n_layers + 1  # each block's first norm once (its memo serves q, k and v), its second, the final
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert all("forward" not in block.ln2.__dict__ for block in tl.blocks) and "forward" not in tl.ln_final.__dict__


@pytest.mark.parametrize("point", ["hook_scale", "hook_normalized"])
def test_a_hook_inside_a_norm_gets_transformer_lens_norm_and_sees_its_values(point):
    tl = _model("RMSPre")
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3)).to(tl.cfg.device)
    seen = {}

    def keep(act, hook):
        seen[hook.name] = act.clone()

    name = f"blocks.1.ln2.{point}"
    with torch.no_grad():
        with own_hooks(tl, [(name, keep)]):
            expected_logits = tl(tokens)
        expected = seen.pop(name)
        with sdpa_attention(tl), NormCalls() as calls, own_hooks(tl, [(name, keep)]):
            logits = tl(tokens)
    assert calls.n == 2 * tl.cfg.n_layers  # the hooked norm ran TransformerLens's operators
    torch.testing.assert_close(seen[name], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
