"""Each attention layer's query, key and value weights, and each gated MLP's gate and input weights,
as views of one matrix, so that one matrix product computes what TransformerLens computes in
three (or two). On a GPU every product is a kernel launch, and short forwards and decoding steps
wait on launches and on the host, not on arithmetic.

The parameters keep their names, shapes, values and the layout `linear_layout` gives them; they
only share memory. A fused forward reads the joint matrix (`joint_weights`) only while every one
of those parameters is still the one it joined and still views it. A parameter that was replaced,
moved to another device or cast (`nn.Module.to`), or copied (`copy.deepcopy`) no longer views it,
and then the separate products run, as TransformerLens's own do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_KEY = "_workbench_joint"


@dataclass(frozen=True)
class Joint:
    weight: Tensor  # [sum of the projections' outputs, d_model], the layout F.linear takes
    bias: Tensor | None  # [sum of outputs], or None when the projections have no bias
    sizes: tuple[int, ...]  # each projection's outputs, in the order of `names`
    names: tuple[str, ...]  # the parameters viewing `weight` and `bias`
    members: tuple[tuple[torch.nn.Parameter, int], ...]  # each parameter with its data_ptr when joined


def _names(module) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(weight names, bias names) of the projections that read the same input, or None."""
    kind, params = type(module).__name__, module._parameters
    if kind in ("Attention", "GroupedQueryAttention"):
        grouped = "_W_K" in params  # grouped-query attention keeps its key/value heads unrepeated here
        return (("W_Q", "_W_K", "_W_V") if grouped else ("W_Q", "W_K", "W_V"),
                ("b_Q", "_b_K", "_b_V") if grouped else ("b_Q", "b_K", "b_V"))
    if kind == "GatedMLP":
        return ("W_gate", "W_in"), ()
    return None


def _rows(w: Tensor) -> Tensor:
    """A weight as [outputs, d_model]: attention's [head, d_model, d_head] or an MLP's [d_model, d_mlp]."""
    return w.permute(0, 2, 1).flatten(0, 1) if w.dim() == 3 else w.T


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """The inverse of `_rows`: a view of `rows` shaped like `like`."""
    if like.dim() == 3:
        return rows.view(like.shape[0], like.shape[2], like.shape[1]).permute(0, 2, 1)
    return rows.T


def join(module) -> None:
    """Make `module`'s projections views of one weight (and one bias); a no-op for a module with
    none to join, or whose projections already share one."""
    names = _names(module)
    if names is None or joint_weights(module, grad=False) is not None:
        return
    weights, biases = names
    params = module._parameters
    if any(params.get(n) is None for n in weights + biases):
        return
    rows = [_rows(params[n].detach()) for n in weights]
    if len({(r.shape[1], r.dtype, r.device) for r in rows}) != 1:
        return
    weight = torch.cat(rows)
    bias = torch.cat([params[n].detach().flatten() for n in biases]) if biases else None
    sizes = tuple(r.shape[0] for r in rows)
    start = 0
    for i, (name, size) in enumerate(zip(weights, sizes)):
        w = params[name]
        params[name] = torch.nn.Parameter(_from_rows(weight[start : start + size], w), requires_grad=w.requires_grad)
        if bias is not None:
            b = params[biases[i]]
            params[biases[i]] = torch.nn.Parameter(bias[start : start + size].view(b.shape), requires_grad=b.requires_grad)
        start += size
    members = tuple((params[n], params[n].data_ptr()) for n in weights + biases)
    module.__dict__[_KEY] = Joint(weight, bias, sizes, weights + biases, members)


def joint_weights(module, grad: bool | None = None) -> Joint | None:
    """`module`'s joint projections while every joined parameter still views them, else None (and
    what was kept is dropped). None too while gradients would flow to a parameter that takes them
    (`grad`: whether gradients are on, by default torch's current setting): the joint matrix
    carries no gradient to the parameters."""
    joint = module.__dict__.get(_KEY)
    if joint is None:
        return None
    params = module._parameters
    for name, (p, ptr) in zip(joint.names, joint.members):
        if params.get(name) is not p or p.data_ptr() != ptr:
            del module.__dict__[_KEY]  # replaced, moved or copied: free the matrix nothing views any more
            return None
    if (torch.is_grad_enabled() if grad is None else grad) and any(p.requires_grad for p, _ in joint.members):
        return None
    return joint


def join_projections(tl) -> None:
    """Join every attention layer's and gated MLP's projections in `tl` (see the module's docstring)."""
    for module in tl.modules():
        join(module)
