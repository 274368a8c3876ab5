"""One forward pass over a task's prompts that hands each layer's attention pattern to a callback.

Head scores that are functions of attention patterns (detectors, sinks, distance profiles) read
every layer's pattern once and reduce it on the spot, so no pattern outlives its layer: memory
stays at one layer's [batch, head, query, key] block, never the whole model's cache.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from workbench.progress import tqdm

from workbench.errors import WorkbenchError

PatternFn = Callable[[int, Float[Tensor, "batch head query key"], Bool[Tensor, "batch query"], slice], None]


@torch.no_grad()
def for_each_pattern(model, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, "batch"], fn: PatternFn,
                     batch_size: int = 16, desc: str = "attention patterns") -> None:
    """Call `fn(layer, pattern, valid, rows)` for every layer and batch of prompts.

    `valid[b, q]` marks real (not padding) query positions of prompt b; `rows` is the batch's
    slice of the task. Keys beyond a prompt's length get no attention from its valid queries
    (causal mask), so callbacks only need to mask queries.
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

        def hook(pattern, hook):
            fn(int(hook.layer()), pattern, valid, rows)

        tl.run_with_hooks(batch, stop_at_layer=model.n_layers,
                          fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), hook)])
