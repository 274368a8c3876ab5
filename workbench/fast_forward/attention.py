"""Fused attention for forwards that read no attention pattern.

TransformerLens computes every head's attention scores and pattern ([head, query, key]) so that
hooks can read them; a long prompt then costs memory and time quadratic in its length even where
nothing reads a pattern (reading a needle prompt into the KV cache before decoding, say).
TransformerLens has no fused-attention path, so `sdpa_attention` swaps each layer's attention
forward, for the duration of a block, for one that computes z with PyTorch's
`scaled_dot_product_attention` (flash or memory-efficient kernels where the device has them): the
same query/key/value projections (one product where the layer's weights are joined and no hook
reads them apart: `workbench.fast_forward.joint_weights`), KV cache, rotary embedding and output projection as
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
from transformer_lens.hook_points import HookPoint

from workbench.fast_forward.block import bare, fire, fused_block, fused_gated_mlp
from workbench.fast_forward.norm import fused_norm
from workbench.fast_forward.joint_weights import joint_weights
from workbench.fast_forward.replacements import ATTENTION_INTERNALS, replaced

SUPPORTED_POSITIONS = ("standard", "rotary")


def covered(attn) -> bool:
    """Whether this attention layer's forward can run fused: a configuration the fused forward
    reproduces and no hook (forward or backward) on its scores or pattern."""
    return _configuration_covered(attn) and not _pattern_hooked(attn)


def _configuration_covered(attn) -> bool:
    cfg = attn.cfg
    return (type(attn).__name__ in ("Attention", "GroupedQueryAttention")
            and cfg.positional_embedding_type in SUPPORTED_POSITIONS
            and (attn._attention_dir_override or cfg.attention_dir) == "causal"
            and not (cfg.attn_scores_soft_cap or 0) > 0 and cfg.clip_qkv is None and not cfg.use_logn_attn
            and not cfg.use_attention_sinks and not cfg.use_attn_result and not cfg.load_in_4bit
            and not cfg.use_dynamic_ntk_rope  # its frequencies change with the length: cached rotated keys would go stale
            and not getattr(cfg, "ungroup_grouped_query_attention", False)
            and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"))


def _pattern_hooked(attn) -> bool:
    return any(point.fwd_hooks or point.bwd_hooks for point in (attn.hook_attn_scores, attn.hook_pattern))


QueriesKeys = Callable[[int, Tensor, Tensor, float], None]  # (layer, queries, keys, scale)


def _version(t: Tensor) -> int | None:
    """`t`'s count of in-place writes; None for a tensor made under `torch.inference_mode`, which
    keeps no count (known by identity alone then: nothing here writes to one in place)."""
    return None if t.is_inference() else t._version


class _Padding:
    """Whether an attention mask masks any key, read once per mask (every layer of a forward gets the
    same mask; reading it waits for the device, which a decoding step should do once, not per layer)."""

    def __init__(self):
        self.last: tuple = (None, -1, False)

    def __call__(self, mask: Tensor | None) -> bool:
        if mask is None:
            return False
        if not (self.last[0] is mask and self.last[1] == _version(mask)):
            self.last = (mask, _version(mask), not bool(mask.all()))
        return self.last[2]


def _fused_forward(attn, original, argmax: dict[int, Tensor] | None, forget: Callable[[], None] | None = None,
                   queries_keys: QueriesKeys | None = None, padding: _Padding | None = None):
    configured, padding = _configuration_covered(attn), padding or _Padding()

    def forward(query_input, key_input, value_input, past_kv_cache_entry=None, additive_attention_mask=None,
                attention_mask=None, position_bias=None):
        if forget is not None:  # the block's inputs are normalised: let its norm drop what it kept
            forget()
        if (additive_attention_mask is not None or position_bias is not None or not configured or _pattern_hooked(attn)
                or replaced(attn, *ATTENTION_INTERNALS) or padding(attention_mask)):
            return original(query_input, key_input, value_input, past_kv_cache_entry=past_kv_cache_entry,
                            additive_attention_mask=additive_attention_mask, attention_mask=attention_mask,
                            position_bias=position_bias)
        q, k, v = _projections(attn, query_input, key_input, value_input)  # [batch, pos, head, d_head]
        rotary, entry = attn.cfg.positional_embedding_type == "rotary", past_kv_cache_entry
        offset = 0 if entry is None else entry.past_keys.size(1)
        if rotary:  # positions are 0, 1, ... (no padding here)
            q = fire(attn.hook_rot_q, _rotary(attn, q, offset))
        if entry is None:
            keys = fire(attn.hook_rot_k, _rotary(attn, k, 0)) if rotary else k
            keys, values = keys.transpose(1, 2), v.transpose(1, 2)
        elif entry.frozen:
            keys, values = _frozen_keys_values(attn, entry, k, v)
        else:
            keys, values = _buffered_keys_values(attn, entry, k, v, offset)
        q = q.transpose(1, 2)  # [batch, head, query, d_head]; keys and values [batch, kv head, key, d_head]
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        scale = 1.0 / float(attn.attn_scale)
        if queries_keys is not None:
            queries_keys(attn.layer_id, q, keys, scale)
        grouped = q.reshape(q.shape[0], keys.shape[1], -1, *q.shape[2:])  # [batch, kv head, group, query, d_head]
        if q.shape[2] == 1 and argmax is not None:  # one query (a decoding step): one row of scores per head, its argmax read off it
            scores = torch.matmul(grouped[:, :, :, 0] * scale, keys.transpose(-1, -2))  # [batch, kv head, group, key]
            argmax[attn.layer_id] = scores.flatten(1, 2).argmax(-1)
            z = torch.matmul(scores.float().softmax(-1).to(values.dtype), values).flatten(1, 2)[:, :, None]
        else:
            if argmax is not None:  # the last query's most-attended key per head: the argmax of its scores
                last = torch.matmul(grouped[:, :, :, -1], keys.transpose(-1, -2))
                argmax[attn.layer_id] = last.flatten(1, 2).argmax(-1)
            n_q, n_k = q.shape[2], keys.shape[2]
            # a query at offset + i sees keys 0 .. offset + i
            mask = None if offset == 0 or n_q == 1 else (torch.arange(n_k, device=q.device)[None, :]
                                             <= offset + torch.arange(n_q, device=q.device)[:, None])
            causal, grouped_keys = offset == 0 and n_q > 1, keys.shape[1] != q.shape[1]
            if grouped_keys and not kernel_takes_groups(q, keys, values, mask, causal):
                keys, values = expand_groups(keys, q.shape[1]), expand_groups(values, q.shape[1])
                grouped_keys = False
            z = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale,
                                               enable_gqa=grouped_keys)
        z = fire(attn.hook_z, z.transpose(1, 2))  # [batch, pos, head, d_head]
        w = attn.W_O.reshape(-1, attn.W_O.shape[-1]).T  # [d_model, head x d_head]
        return F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w.dtype), w, attn.b_O)

    return forward


_TAKES_GROUPS: dict[tuple, bool] = {}


def kernel_takes_groups(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, causal: bool) -> bool:
    """Whether a fused kernel takes grouped keys and values as they are. The CPU's does. On CUDA,
    where PyTorch says neither flash attention (half precision, no mask) nor its memory-efficient
    kernel would, it falls back to its math path, which holds every head's [query, key] scores
    (a float32 model, a prompt read in masked chunks). Asked once per kind of call (dtype, mask or
    not, causal, head size, gradients)."""
    if q.device.type != "cuda":
        return True
    kind = (q.dtype, mask is None, causal, q.shape[-1], q.requires_grad, q.device)
    if kind not in _TAKES_GROUPS:
        params = torch.backends.cuda.SDPAParams(q, keys, values, mask, 0.0, causal, True)
        _TAKES_GROUPS[kind] = (torch.backends.cuda.can_use_flash_attention(params)
                               or torch.backends.cuda.can_use_efficient_attention(params))
    return _TAKES_GROUPS[kind]


def expand_groups(t: Tensor, n_heads: int) -> Tensor:
    """Grouped keys or values [batch, kv head, key, d] as one head each [batch, head, key, d]:
    query head h reads kv head h // group, as `enable_gqa` does."""
    return t.repeat_interleave(n_heads // t.shape[1], dim=1)


def _projections(attn, query_input: Tensor, key_input: Tensor, value_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values [batch, pos, head, d_head]: one product by the layer's joint
    weight (`workbench.fast_forward.joint_weights`) where the three read the same input, no hook
    reads them and nothing replaced `calculate_qkv_matrices` on the layer (a circuit run's per-head
    inputs: `workbench.fast_forward.replacements`), views of its output then; else that method."""
    joint, cfg = joint_weights(attn), attn.cfg
    if (joint is None or replaced(attn, "calculate_qkv_matrices") or not (query_input is key_input is value_input)
            or cfg.use_qk_norm or cfg.use_split_qkv_input
            or cfg.use_attn_in or not (bare(attn.hook_q) and bare(attn.hook_k) and bare(attn.hook_v))):
        return attn.calculate_qkv_matrices(query_input, key_input, value_input)
    out = F.linear(query_input, joint.weight, joint.bias)
    return tuple(part.unflatten(-1, (-1, cfg.d_head)) for part in out.split(joint.sizes, -1))


def _rotary(attn, x: Tensor, offset: int) -> Tensor:
    """TransformerLens's rotary embedding of `x` [batch, pos, head, d_head] at positions offset,
    offset + 1, ...: x cos + rotate_half(x) sin in three kernels where TransformerLens's takes eight
    (a clone and two indexed copies to rotate, a final concatenation); its own where the layer
    rotates only part of each head, pairs adjacent dimensions or needs a longer table."""
    cfg, end, length = attn.cfg, offset + x.shape[1], attn.rotary_cos.shape[0]
    if length < end <= cfg.n_ctx and hasattr(attn, "_extend_rotary_embeddings"):
        # grow the table as TransformerLens would on first need, so the same kernels (and bfloat16
        # rounding) run before and after it has grown: a session's first long prompt reads as its next
        attn._extend_rotary_embeddings(min(cfg.n_ctx, max(end, 2 * length)))
        length = attn.rotary_cos.shape[0]
    cos, sin = _tables(attn)
    if cfg.rotary_dim != x.shape[-1] or cfg.rotary_adjacent_pairs or end > length or x.device != cos.device:
        return attn.apply_rotary(x, offset)
    # roll by half a head: cat([x2, x1]), rotate_half(x) up to the sign the table carries
    return torch.addcmul(x * cos[:, offset:end], x.roll(x.shape[-1] // 2, -1), sin[:, offset:end])


def _tables(attn) -> tuple[Tensor, Tensor]:
    """TransformerLens's cosine table and its sine table with the first half negated, each
    [1, position, 1, d_head]: rotate_half(x) * sin is then cat([x2, x1]) * this, the same products
    (a sign moves between factors), with no kernel negating half of every query and key. Kept on
    the layer until its tables are replaced (grown, moved) or the sine table written to (the
    cosine one is a view: it reads any write)."""
    cos, sin, kept = attn.rotary_cos, attn.rotary_sin, attn.__dict__.get("_workbench_rotary")
    if kept is None or kept[0] is not cos or kept[1] is not sin or kept[2] != _version(sin):
        half = sin.shape[-1] // 2
        kept = (cos, sin, _version(sin), cos[None, :, None], torch.cat([-sin[:, :half], sin[:, half:]], -1)[None, :, None])
        attn.__dict__["_workbench_rotary"] = kept
    return kept[3], kept[4]


def _frozen_keys_values(attn, entry, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """A frozen entry (a prefix shared by many runs) is not extended: its keys and values with the
    new ones, every key rotated, as TransformerLens does."""
    keys, values = entry.append(k, v)
    if attn.cfg.positional_embedding_type == "rotary":
        keys = fire(attn.hook_rot_k, _rotary(attn, keys, 0))
    return keys.transpose(1, 2), values.transpose(1, 2)


class _Storage:
    """An entry's keys, values and (rotary) rotated keys, in [batch, kv head, capacity, d_head]
    tensors filled in place. TransformerLens's entry concatenates its whole cache at every step and
    rotates every cached key again; here a step writes only its new keys and values (rotating only
    the new keys), and the entry's past_keys/past_values become views of the filled part, so
    TransformerLens's own forward and anything else that reads the entry see the usual tensors."""

    def __init__(self, attn, entry, capacity: int):
        past_k, past_v = entry.past_keys, entry.past_values
        batch, n, n_kv, d_head = past_k.shape
        self.keys = past_k.new_empty(batch, n_kv, capacity, d_head)
        self.values = past_v.new_empty(batch, n_kv, capacity, d_head)
        self.keys[:, :, :n] = past_k.transpose(1, 2)
        self.values[:, :, :n] = past_v.transpose(1, 2)
        self.rotated = None
        if attn.cfg.positional_embedding_type == "rotary":
            self.rotated = past_k.new_empty(batch, n_kv, capacity, d_head)
            self.rotated[:, :, :n] = _rotary(attn, past_k, 0).transpose(1, 2)
        self.capacity = capacity
        self.views = (past_k, past_v)

    def holds(self, entry) -> bool:
        """Whether the entry still holds the views this storage last gave it (nothing replaced them)."""
        return entry.past_keys is self.views[0] and entry.past_values is self.views[1]

    def append(self, attn, entry, k: Tensor, v: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        end = offset + k.shape[1]
        self.keys[:, :, offset:end] = k.transpose(1, 2)
        self.values[:, :, offset:end] = v.transpose(1, 2)
        self.views = entry.past_keys, entry.past_values = (self.keys[:, :, :end].transpose(1, 2),
                                                           self.values[:, :, :end].transpose(1, 2))
        if self.rotated is None:
            return self.keys[:, :, :end], self.values[:, :, :end]
        if not bare(attn.hook_rot_k):  # a hook on the rotated keys sees (and may change) every key, as in TransformerLens
            keys = attn.hook_rot_k(_rotary(attn, entry.past_keys, 0)).transpose(1, 2)
        else:
            keys = self.rotated[:, :, :end]
        self.rotated[:, :, offset:end] = _rotary(attn, k, offset).transpose(1, 2)
        return keys, self.values[:, :, :end]


def _buffered_keys_values(attn, entry, k: Tensor, v: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """The entry's keys (rotated) and values with the new ones appended, [batch, kv head, key, d_head]."""
    store, end = getattr(entry, "_workbench_storage", None), offset + k.shape[1]
    if store is None or not store.holds(entry) or store.capacity < end:
        entry._workbench_storage = None  # free a stale storage before allocating its successor
        reserved = getattr(entry, "_workbench_reserve", 0)
        store = entry._workbench_storage = _Storage(attn, entry, reserved if reserved >= end else end + end // 8 + 16)
    return store.append(attn, entry, k, v, offset)


def reserve(cache, n_tokens: int) -> None:
    """Size the storage of each of `cache`'s entries for `n_tokens` keys in all, so a decode of known
    length never reallocates (without it storage grows by an eighth when full)."""
    for entry in cache.entries:
        entry._workbench_reserve = n_tokens


def _normalised_once(ln, original):
    """TransformerLens's block normalises the same residual three times, once each for the queries,
    keys and values; here a repeat of the last input (the same tensor, not modified since) returns
    the last output, unless a hook on the norm would see each call. What it keeps is dropped when
    the block's attention starts (`forward.forget`)."""
    points, last = [m for m in ln.modules() if isinstance(m, HookPoint)], []

    def forward(x):
        if any(point.fwd_hooks or point.bwd_hooks for point in points):
            return original(x)
        if last and last[0] is x and last[1] == _version(x):
            return last[2]
        out = original(x)
        last[:] = [x, _version(x), out]
        return out

    def forget():  # called by the block's attention, so no layer's norm outlives its block
        last.clear()
        if hasattr(original, "forget"):  # an enclosing block's memo, which that block's attention never reaches
            original.forget()

    forward.forget = forget
    return forward


@contextmanager
def sdpa_attention(tl, argmax: dict[int, Tensor] | None = None, queries_keys: QueriesKeys | None = None) -> Iterator[bool]:
    """Within the block, every attention layer the fused forward covers runs it (checked again at
    each call, so a pattern hook added inside the block falls back). Yields whether all layers
    are covered now, so callers can size their chunks for a forward with no score matrices. With
    `argmax`, each fused layer also records, by layer, its last query's most-attended key
    ([batch, head]; the pattern's argmax, read from the scores without the softmax). With
    `queries_keys`, each fused layer hands it (layer, queries [batch, head, query, d_head], keys
    [batch, kv head, key, d_head], scale): the rotated queries and keys its scores are made of, so a
    caller can compute the pattern in blocks of its own choosing. The blocks' and the final norms run
    as PyTorch's own where no hook reads inside them (`workbench.fast_forward.norm`), blocks and gated MLPs
    without TransformerLens's idle additions (`workbench.fast_forward.block`). Entered again inside
    itself with the same `argmax` and `queries_keys` (a decoding loop around per-step calls), it
    swaps nothing."""
    if all(getattr(block.attn.forward, "fused_with", None) == (id(argmax), id(queries_keys)) for block in tl.blocks):
        yield all(covered(block.attn) for block in tl.blocks)  # already inside the same block: nothing to swap
        return
    swapped, padding = [], _Padding()

    def swap(module, forward) -> None:
        swapped.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
        module.forward = forward

    try:
        for norm in [getattr(block, "ln2", None) for block in tl.blocks] + [getattr(tl, "ln_final", None)]:
            if norm is not None and (fused := fused_norm(norm, norm.forward)):
                swap(norm, fused)
        for block in tl.blocks:
            for module, fuse in ((block, fused_block), (getattr(block, "mlp", None), fused_gated_mlp)):
                if module is not None and (forward := fuse(module)):
                    swap(module, forward)
            ln1, forget = getattr(block, "ln1", None), None
            if ln1 is not None and any(isinstance(m, HookPoint) for m in ln1.modules()):
                swap(ln1, _normalised_once(ln1, fused_norm(ln1, ln1.forward) or ln1.forward))
                forget = ln1.forward.forget
            if replaced(block.attn, "forward") and not hasattr(block.attn.forward, "fused_with"):
                continue  # replaced by someone else: theirs runs
            swap(block.attn, _fused_forward(block.attn, block.attn.forward, argmax, forget, queries_keys, padding))
            block.attn.forward.fused_with = (id(argmax), id(queries_keys))
        yield all(covered(block.attn) for block in tl.blocks)
    finally:
        for module, had, before in swapped:
            if had:
                module.forward = before
            else:
                del module.forward


def fused_attention(fn: Callable) -> Callable:
    """Decorate a method function `fn(model, ...)` to run with fused attention throughout."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with sdpa_attention(model.tl):
            return fn(model, *args, **kwargs)

    return wrapper
