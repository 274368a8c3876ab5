"""`own_hooks` adds and removes exactly its own hooks: the same output as TransformerLens's
`run_with_hooks`, nothing left behind (even after an exception), other hooks untouched."""

import pytest
import torch

from workbench.fast_forward.own_hooks import own_hooks
from conftest import make_toy_tl


def test_own_hooks_equal_run_with_hooks_and_leave_only_what_was_there():
    tl = make_toy_tl(n_layers=2, attn_only=False, normalization_type="LN")
    x = torch.randint(0, 50, (3, 7))
    seen = []
    keep = ("blocks.0.hook_resid_post", lambda act, hook: seen.append(hook.name))
    tl.add_hook(*keep)  # somebody else's hook: must survive
    zero_head = ("blocks.1.attn.hook_z", lambda act, hook: act * 0)
    double_mlp = (lambda name: name.endswith("hook_mlp_out"), lambda act, hook: 2 * act)
    with torch.no_grad():
        expected = tl.run_with_hooks(x, fwd_hooks=[zero_head, double_mlp], reset_hooks_end=False)
        tl.reset_hooks()
        tl.add_hook(*keep)
        with own_hooks(tl, [zero_head, double_mlp]):
            got = tl(x)
        assert torch.equal(got, expected)
        assert not torch.equal(tl(x), expected)  # the hooks are gone
        with pytest.raises(RuntimeError, match="boom"), own_hooks(tl, [("blocks.0.hook_resid_pre", _boom)]):
            tl(x)
    counts = {name: len(hp.fwd_hooks) for name, hp in tl.hook_dict.items() if hp.fwd_hooks}
    assert counts == {"blocks.0.hook_resid_post": 1}
    assert seen.count("blocks.0.hook_resid_post") >= 3


def _boom(act, hook):
    raise RuntimeError("boom")
