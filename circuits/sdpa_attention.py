"""Fused attention for forwards that read no attention pattern.

TransformerLens computes every head's attention scores and pattern ([head, query, key]) so that
hooks can read them; a long prompt then costs memory and time quadratic in its length even where
nothing reads a pattern (reading a needle prompt into the KV cache before decoding, say).
TransformerLens has no fused-attention path, so `sdpa_attention` swaps each layer's attention
forward, for the duration of a block, for one that computes z with PyTorch's
`scaled_dot_product_attention` (flash or memory-efficient kernels where the device has them): the
same query/key/value projections, KV cache, rotary embedding and output projection as
TransformerLens's own forward, with hook_q/k/v, hook_rot_q/k and hook_z still firing. A layer whose
configuration this does not cover (ALiBi, soft-capped scores, sinks, QK clipping, per-head results
and the like), or whose scores or pattern carry a hook, keeps TransformerLens's forward, so results
never depend on which path ran beyond float rounding.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_POSITIONS = ("standard", "rotary")


def covered(attn) -> bool:
    """Whether this attention layer's forward can run fused: a configuration the fused forward
    reproduces and no hook (forward or backward) on its scores or pattern."""
    cfg = attn.cfg
    return (type(attn).__name__ in ("Attention", "GroupedQueryAttention")
            and cfg.positional_embedding_type in SUPPORTED_POSITIONS
            and (attn._attention_dir_override or cfg.attention_dir) == "causal"
            and not (cfg.attn_scores_soft_cap or 0) > 0 and cfg.clip_qkv is None and not cfg.use_logn_attn
            and not cfg.use_attention_sinks and not cfg.use_attn_result and not cfg.load_in_4bit
            and not getattr(cfg, "ungroup_grouped_query_attention", False)
            and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
            and not any(point.fwd_hooks or point.bwd_hooks for point in (attn.hook_attn_scores, attn.hook_pattern)))


def _fused_forward(attn, original, argmax: dict[int, Tensor] | None):
    def forward(query_input, key_input, value_input, past_kv_cache_entry=None, additive_attention_mask=None,
                attention_mask=None, position_bias=None):
        padded = attention_mask is not None and not bool(attention_mask.all())
        if additive_attention_mask is not None or position_bias is not None or padded or not covered(attn):
            return original(query_input, key_input, value_input, past_kv_cache_entry=past_kv_cache_entry,
                            additive_attention_mask=additive_attention_mask, attention_mask=attention_mask,
                            position_bias=position_bias)
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # [batch, pos, head, d_head]
        offset, entry, past = 0, past_kv_cache_entry, None
        if entry is not None:
            past = entry.past_keys
            offset = past.size(1)
            new_k = k
            k, v = entry.append(k, v)
        if attn.cfg.positional_embedding_type == "rotary":  # positions are 0, 1, ... (no padding here)
            q = attn.hook_rot_q(attn.apply_rotary(q, offset))
            k = _rotated_keys(attn, entry, past, new_k, offset) if entry is not None else attn.hook_rot_k(attn.apply_rotary(k, 0))
        n_q, n_k = q.shape[1], k.shape[1]
        # a query at offset + i sees keys 0 .. offset + i
        mask = None if offset == 0 else (torch.arange(n_k, device=q.device)[None, :]
                                         <= offset + torch.arange(n_q, device=q.device)[:, None])
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                           attn_mask=mask, is_causal=offset == 0 and n_q > 1,
                                           scale=1.0 / float(attn.attn_scale), enable_gqa=k.shape[2] != q.shape[2])
        if argmax is not None:  # the last query's most-attended key per head: the argmax of its scores
            last = q[:, -1].reshape(q.shape[0], k.shape[2], -1, q.shape[-1])  # [batch, kv head, group, d_head]
            argmax[attn.layer_id] = torch.einsum("bkgd,btkd->bkgt", last, k.to(q.dtype)).flatten(1, 2).argmax(-1)
        z = attn.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        w = attn.W_O.reshape(-1, attn.W_O.shape[-1]).T  # [d_model, head x d_head]
        return F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w.dtype), w, attn.b_O)

    return forward


def _rotated_keys(attn, entry, past: Tensor, new_k: Tensor, offset: int) -> Tensor:
    """Every cached key, rotated. TransformerLens caches keys unrotated and rotates all of them at
    each step; here the entry also keeps them rotated, so a step rotates only its new keys. The
    rotated copy is used only while it matches the cache's keys (the same tensor, as a fused step
    left it); otherwise, or when hook_rot_k has a hook (it sees every key), all are rotated."""
    kept = getattr(entry, "_rotated_for", None)
    if attn.hook_rot_k.fwd_hooks or kept is not past or entry._rotated.shape[:2] != past.shape[:2]:
        rotated = attn.hook_rot_k(attn.apply_rotary(torch.cat([past, new_k], 1), 0))
    else:
        rotated = torch.cat([entry._rotated, attn.apply_rotary(new_k, offset)], 1)
    entry._rotated, entry._rotated_for = rotated, entry.past_keys
    return rotated


@contextmanager
def sdpa_attention(tl, argmax: dict[int, Tensor] | None = None) -> Iterator[bool]:
    """Within the block, every attention layer the fused forward covers runs it (checked again at
    each call, so a pattern hook added inside the block falls back). Yields whether all layers
    are covered now, so callers can size their chunks for a forward with no score matrices. With
    `argmax`, each fused layer also records, by layer, its last query's most-attended key
    ([batch, head]; the pattern's argmax, read from the scores without the softmax)."""
    swapped = []
    try:
        for block in tl.blocks:
            attn = block.attn
            swapped.append((attn, "forward" in attn.__dict__, attn.__dict__.get("forward")))
            attn.forward = _fused_forward(attn, attn.forward, argmax)
        yield all(covered(block.attn) for block in tl.blocks)
    finally:
        for attn, had, before in swapped:
            if had:
                attn.forward = before
            else:
                del attn.forward


def fused_attention(fn: Callable) -> Callable:
    """Decorate a method function `fn(model, ...)` to run with fused attention throughout."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with sdpa_attention(model.tl):
            return fn(model, *args, **kwargs)

    return wrapper
