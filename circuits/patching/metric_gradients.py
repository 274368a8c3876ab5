"""The metric's gradient at hooked activations of a run, with bounded memory.

An ordinary backward keeps every layer's saved activations until it reaches them, and each layer
keeps a [head, query, key] pattern or two: on the embedded model at 8k tokens ~4 GiB a layer in
bfloat16, ~117 GiB for all thirty. When one prompt's whole graph does not fit the budget, the
gradient is taken a layer at a time instead: a forward without gradients keeps each block's input
(the residual, [batch, pos, d_model]), then from the last layer down each block is run again from
its input and backpropagated with the gradient of its output, so only one layer's graph is ever
held, for the price of a second forward. `torch.utils.checkpoint` does the same recomputation,
but inside one backward the hooks of TransformerLens would fire on both forwards; this runs the
blocks directly, so every hook fires once, where it is expected.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from workbench.fast_forward.own_hooks import own_hooks


def gradients(tl, tokens: Tensor, names: list[str], value_of: Callable[[Tensor], Tensor],
              layerwise: bool, layer_done: Callable[[], object] = lambda: None
              ) -> tuple[float, dict[str, Tensor], dict[str, Tensor]]:
    """(value, activations, gradients): `value_of(final residual)`, a scalar, its gradient at each
    hook of `names` (all inside the blocks), and those hooks' activations, on the run of `tokens`.
    Layer by layer, `layer_done()` is called as each layer's backward ends (progress)."""
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def save_act(act, hook):
        acts[hook.name] = act.detach()

    def save_grad(grad, hook):
        grads[hook.name] = grad.detach()

    n = tl.cfg.n_layers
    if not layerwise:
        def need_grad(act, hook):  # the weights are frozen: the backward starts from the embeddings
            return act.requires_grad_(True)

        with torch.enable_grad(), own_hooks(tl, [("hook_embed", need_grad)] + [(h, save_act) for h in names],
                                            [(h, save_grad) for h in names]):
            value = value_of(tl(tokens, stop_at_layer=n))
            value.backward()
        return float(value.detach()), acts, grads

    inputs: list[Tensor | None] = []
    calls: list[tuple[tuple, dict]] = []

    def keep_input(module, args, kwargs):
        inputs.append(args[0].detach())
        calls.append((args[1:], kwargs))

    handles = [block.register_forward_pre_hook(keep_input, with_kwargs=True) for block in tl.blocks]
    try:
        with torch.no_grad(), own_hooks(tl, [(h, save_act) for h in names]):
            final = tl(tokens, stop_at_layer=n)
    finally:
        for handle in handles:
            handle.remove()
    with torch.enable_grad():
        final.requires_grad_(True)
        value = value_of(final)
        (grad,) = torch.autograd.grad(value, final)
        for layer in reversed(range(n)):
            x = inputs[layer].requires_grad_(True)
            inputs[layer] = None
            args, kwargs = calls[layer]
            here = [(h, save_grad) for h in names if h.startswith(f"blocks.{layer}.")]
            with own_hooks(tl, bwd_hooks=here):
                tl.blocks[layer](x, *args, **kwargs).backward(grad)
            grad = x.grad
            layer_done()
    return float(value.detach()), acts, grads
