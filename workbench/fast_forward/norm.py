"""PyTorch's own normalisation in place of TransformerLens's, where no hook reads inside a norm.

TransformerLens writes each norm out of elementwise operators (upcast, square, mean, add, square
root, divide, downcast: seven kernels on a GPU for a bfloat16 RMS norm, each reading and writing
the residual) so that `hook_scale` and `hook_normalized` can see the intermediate values. Where
neither carries a hook, `F.rms_norm` / `F.layer_norm` compute the same normalisation: one fused
kernel on CUDA for either (PyTorch's CPU build writes `rms_norm` out of the same operators;
`layer_norm` is one kernel there too), reductions in float32 whatever the model's dtype, as
TransformerLens's upcast gives. Results differ from TransformerLens's by rounding only.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from workbench.fast_forward.replacements import replaced

NORMS = ("RMSNormPre", "RMSNorm", "LayerNormPre", "LayerNorm")


def fused_norm(ln, original: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor] | None:
    """A forward for TransformerLens norm `ln` computing it with PyTorch's norm, and falling back to
    `original` while a hook is on the norm's scale or output or its weights differ from the input in
    device or dtype (TransformerLens's own handling of those is kept); None for a module that is not one of TransformerLens's four norms."""
    kind = type(ln).__name__
    if kind not in NORMS or replaced(ln, "forward"):  # a replaced forward is honoured: it runs, not PyTorch's norm
        return None
    points, dtype = (ln.hook_scale, ln.hook_normalized), ln.cfg.dtype

    def forward(x: Tensor) -> Tensor:
        weight, bias = getattr(ln, "w", None), getattr(ln, "b", None)
        if any(point.fwd_hooks or point.bwd_hooks for point in points) or (
                weight is not None and (weight.device != x.device or weight.dtype != x.dtype)):
            return original(x)
        shape = (x.shape[-1],)
        if kind.startswith("RMS"):
            return F.rms_norm(x, shape, weight, ln.eps).to(dtype)
        return F.layer_norm(x, shape, weight, bias, ln.eps).to(dtype)

    return forward
