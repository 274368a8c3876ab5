"""One forward pass over a task's prompts that hands each layer's attention pattern to a callback,
a block of queries at a time.

Head scores that are functions of attention patterns (detectors, sinks, distance profiles,
stored patterns) read every layer's pattern once and reduce it on the spot, so no pattern
outlives its layer. Where a layer runs fused attention (`workbench.fast_forward.attention`, every
configuration it covers) its pattern is computed here from the layer's own rotated queries and
keys, PATTERN_BYTES of rows at a time (float32 scores and softmax), so not even one layer's
[head, query, key] block is held at once: at 8k tokens that block is 2.4 GB per prompt on the
embedded model. A layer that cannot run fused hands over TransformerLens's whole pattern.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from workbench.progress import tqdm

from workbench.fast_forward.own_hooks import own_hooks
from workbench.fast_forward.attention import covered, sdpa_attention
from workbench.errors import WorkbenchError

# (layer, pattern [batch, head, query, key] of the queries at `queries` against keys 0 .. queries.stop - 1,
#  valid [batch, pos] over all positions, rows of the task, queries)
PatternFn = Callable[[int, Float[Tensor, "batch head query key"], Bool[Tensor, "batch pos"], slice, slice], None]

PATTERN_BYTES = 256 * 2**20  # a block of pattern rows and the callbacks' copies of it
COPIES = 6  # float32 copies of a block a callback may hold at once (masked, weighted, float64)


@torch.no_grad()
def for_each_pattern(model, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, "batch"], fn: PatternFn,
                     batch_size: int = 16, desc: str = "attention patterns") -> None:
    """Call `fn(layer, pattern, valid, rows, queries)` for every layer, batch of prompts and block
    of queries; the blocks of a layer cover its queries once, in order.

    `valid[b, q]` marks real (not padding) positions of prompt b; `rows` is the batch's slice of
    the task. Keys beyond a prompt's length get no attention from its valid queries (causal mask),
    so callbacks only need to mask queries.
    """
    if batch_size < 1:
        raise WorkbenchError("batch_size must be at least 1")
    tl = model.tl
    n = tokens.shape[0]
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=n <= batch_size):
        rows = slice(start, min(n, start + batch_size))
        width = int(lengths[rows].max())
        batch = tokens[rows, :width]
        valid = torch.arange(width, device=tokens.device)[None, :] < lengths[rows, None]

        handed = set()

        def blocks(layer: int, q: Tensor, keys: Tensor, scale: float) -> None:
            handed.add(layer)
            keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], 1)  # each query head's keys
            step = max(1, PATTERN_BYTES // (COPIES * 4 * q.shape[0] * q.shape[1] * width))
            for first in range(0, width, step):
                last = min(width, first + step)
                scores = torch.matmul(q[:, :, first:last].float(), keys[:, :, :last].float().transpose(-1, -2)) * scale
                future = torch.arange(last, device=q.device)[None, :] > torch.arange(first, last, device=q.device)[:, None]
                fn(layer, scores.masked_fill_(future, float("-inf")).softmax(-1), valid, rows, slice(first, last))

        def whole(pattern, hook):
            handed.add(hook.layer())
            fn(int(hook.layer()), pattern, valid, rows, slice(0, width))

        unfused = [(f"blocks.{layer}.attn.hook_pattern", whole) for layer, block in enumerate(tl.blocks) if not covered(block.attn)]
        with own_hooks(tl, unfused), sdpa_attention(tl, queries_keys=blocks):
            # an explicit mask: TransformerLens would otherwise treat pad-token ids in a prompt as padding
            tl(batch, attention_mask=torch.ones_like(batch), stop_at_layer=model.n_layers)
        if len(handed) != model.n_layers:
            raise RuntimeError(f"attention patterns of layers {sorted(set(range(model.n_layers)) - handed)} were not read")
