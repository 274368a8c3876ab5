"""A transformer block's and a gated MLP's forward without TransformerLens's idle elementwise kernels.

Three of TransformerLens's operators on every layer compute nothing a result needs, yet each reads
and writes a whole activation (a GPU kernel apiece): its block adds `0.0` to the normalised
residual for the queries and again for the keys (where a shortformer position embedding would be
added), and its gated MLP adds `b_in` in a kernel of its own after multiplying the activation by
the linear branch. Within fused attention (`circuits.sdpa_attention`) these forwards stand in for
TransformerLens's in the plain pre-norm configuration: the same operators otherwise, the bias
added by `addcmul` in the multiplication's kernel, every hook point firing as before. Any other
configuration, or a module whose forward something else has already replaced, keeps its own.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES


def fused_block(block) -> Callable | None:
    """The block's forward without the `+ 0.0` on its query and key inputs; TransformerLens's own
    for a shortformer position embedding or split or repeated attention inputs (checked at each
    call: they can be switched on inside a fused run); None for a configuration it does not cover."""
    cfg = block.cfg
    if (type(block).__name__ != "TransformerBlock" or cfg.parallel_attn_mlp or cfg.use_normalization_before_and_after
            or cfg.original_architecture in POST_NORM_ARCHITECTURES or "forward" in block.__dict__):
        return None
    original = block.forward

    def forward(resid_pre: Tensor, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None) -> Tensor:
        if shortformer_pos_embed is not None or cfg.use_attn_in or cfg.use_split_qkv_input:
            return original(resid_pre, shortformer_pos_embed=shortformer_pos_embed, past_kv_cache_entry=past_kv_cache_entry,
                            attention_mask=attention_mask)
        resid_pre = block.hook_resid_pre(resid_pre)
        attn_out = block.hook_attn_out(block.attn(query_input=block.ln1(resid_pre), key_input=block.ln1(resid_pre),
                                                  value_input=block.ln1(resid_pre), past_kv_cache_entry=past_kv_cache_entry,
                                                  attention_mask=attention_mask))
        if resid_pre.device != attn_out.device:
            resid_pre = resid_pre.to(attn_out.device)
        if cfg.attn_only:
            return block.hook_resid_post(resid_pre + attn_out)
        resid_mid = block.hook_resid_mid(resid_pre + attn_out)
        mlp_in = block.hook_mlp_in(resid_mid.clone()) if cfg.use_hook_mlp_in else resid_mid
        return block.hook_resid_post(resid_mid + block.apply_mlp(block.ln2(mlp_in)))

    return forward


def fused_gated_mlp(mlp) -> Callable | None:
    """A gated MLP's forward with `b_in` added in the multiplication's kernel (`addcmul`: one
    rounding where TransformerLens's two kernels round twice; the same values for a zero bias);
    None for any other MLP or one whose forward is already replaced."""
    if type(mlp).__name__ != "GatedMLP" or mlp.cfg.is_layer_norm_activation() or "forward" in mlp.__dict__:
        return None
    original = mlp.forward

    def forward(x: Tensor) -> Tensor:
        if x.device != mlp.W_gate.device:
            return original(x)
        pre_act = mlp.hook_pre(F.linear(x, mlp.W_gate.T.contiguous()))
        pre_linear = mlp.hook_pre_linear(F.linear(x, mlp.W_in.T.contiguous()))
        post_act = mlp.hook_post(torch.addcmul(mlp.b_in, mlp.act_fn(pre_act), pre_linear))
        return F.linear(post_act, mlp.W_out.T.contiguous(), mlp.b_out)

    return forward
