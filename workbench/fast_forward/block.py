"""A transformer block's and a gated MLP's forward without TransformerLens's idle elementwise kernels.

Three of TransformerLens's operators on every layer compute nothing a result needs, yet each reads
and writes a whole activation (a GPU kernel apiece): its block adds `0.0` to the normalised
residual for the queries and again for the keys (where a shortformer position embedding would be
added), and its gated MLP adds `b_in` in a kernel of its own after multiplying the activation by
the linear branch. Within fused attention (`workbench.fast_forward.attention`) these forwards stand in for
TransformerLens's in the plain pre-norm configuration: the same operators otherwise, the bias
added by `addcmul` in the multiplication's kernel, every hook point firing as before. Any other
configuration, or a module whose forward something else has already replaced, keeps its own.
They also call hook points and submodules that carry no hook without `nn.Module`'s call machinery
(`fire`, `call`; a hook point is the identity then): some fifteen calls a layer, host time that a
GPU's short forwards and decoding steps wait on. Where the gate and input weights share one
matrix (`workbench.fast_forward.joint_weights`) and no hook reads them apart, one product computes both.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as torch_module
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from workbench.fast_forward.joint_weights import joint_weights
from workbench.fast_forward.replacements import replaced


def bare(module) -> bool:
    """Whether calling `module` runs its forward alone: no hook on it or on every module, no
    compiled call, no tracing (`nn.Module._call_impl`'s own test for its shortcut)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks
                or module._compiled_call_impl is not None or torch._C._get_tracing_state())


def fire(point, x: Tensor) -> Tensor:
    """`point(x)` for a TransformerLens hook point: `x` itself where nothing is registered on it."""
    return x if bare(point) else point(x)


def call(module, *args, **kwargs):
    """`module(*args, **kwargs)`, its forward called directly where no hook would run."""
    return module.forward(*args, **kwargs) if bare(module) else module(*args, **kwargs)


def fused_block(block) -> Callable | None:
    """The block's forward without the `+ 0.0` on its query and key inputs; TransformerLens's own
    for a shortformer position embedding or split or repeated attention inputs (checked at each
    call: they can be switched on inside a fused run); None for a configuration it does not cover."""
    cfg = block.cfg
    if (type(block).__name__ != "TransformerBlock" or cfg.parallel_attn_mlp or cfg.use_normalization_before_and_after
            or cfg.original_architecture in POST_NORM_ARCHITECTURES or replaced(block, "forward")):
        return None
    original = block.forward

    def forward(resid_pre: Tensor, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None) -> Tensor:
        if shortformer_pos_embed is not None or cfg.use_attn_in or cfg.use_split_qkv_input:
            return original(resid_pre, shortformer_pos_embed=shortformer_pos_embed, past_kv_cache_entry=past_kv_cache_entry,
                            attention_mask=attention_mask)
        resid_pre = fire(block.hook_resid_pre, resid_pre)
        ln1 = block.ln1
        attn_out = fire(block.hook_attn_out, call(block.attn, query_input=call(ln1, resid_pre), key_input=call(ln1, resid_pre),
                                                  value_input=call(ln1, resid_pre), past_kv_cache_entry=past_kv_cache_entry,
                                                  attention_mask=attention_mask))
        if resid_pre.device != attn_out.device:
            resid_pre = resid_pre.to(attn_out.device)
        if cfg.attn_only:
            return fire(block.hook_resid_post, resid_pre + attn_out)
        resid_mid = fire(block.hook_resid_mid, resid_pre + attn_out)
        mlp_in = fire(block.hook_mlp_in, resid_mid.clone()) if cfg.use_hook_mlp_in else resid_mid
        return fire(block.hook_resid_post, resid_mid + fire(block.hook_mlp_out, call(block.mlp, call(block.ln2, mlp_in))))

    return forward


def fused_gated_mlp(mlp) -> Callable | None:
    """A gated MLP's forward with `b_in` added in the multiplication's kernel (`addcmul`: one
    rounding where TransformerLens's two kernels round twice; the same values for a zero bias);
    None for any other MLP or one whose forward is already replaced."""
    if type(mlp).__name__ != "GatedMLP" or mlp.cfg.is_layer_norm_activation() or replaced(mlp, "forward"):
        return None
    original = mlp.forward

    def forward(x: Tensor) -> Tensor:
        if x.device != mlp.W_gate.device:
            return original(x)
        joint = joint_weights(mlp)
        if joint is not None and bare(mlp.hook_pre) and bare(mlp.hook_pre_linear):
            pre_act, pre_linear = F.linear(x, joint.weight).split(joint.sizes, -1)
        else:
            pre_act = fire(mlp.hook_pre, F.linear(x, mlp.W_gate.T.contiguous()))
            pre_linear = fire(mlp.hook_pre_linear, F.linear(x, mlp.W_in.T.contiguous()))
        post_act = fire(mlp.hook_post, torch.addcmul(mlp.b_in, mlp.act_fn(pre_act), pre_linear))
        return F.linear(post_act, mlp.W_out.T.contiguous(), mlp.b_out)

    return forward
