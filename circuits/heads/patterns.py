"""`attention.patterns`: every head's attention pattern on a few prompts, stored for viewing.

The dashboard's head pages and prompt explorer draw patterns from here, so a pattern is
computed once per (model, prompts) and read back without loading the model. Patterns are
[prompt, layer, head, query, key] tensors, so this is for short prompts: `max_tokens` bounds it.
Each head also gets its mean attention entropy (nats), a scalar that tells diffuse heads from
sharp ones on the head atlas.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from workbench.fast_forward.attention_pass import for_each_pattern
from circuits.heads.scores import head_frame
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.params import require
from workbench.result import Result


@dataclass(frozen=True)
class PatternParams:
    n_prompts: int = 4
    max_tokens: int = 128

    def __post_init__(self):
        require(self.n_prompts >= 1, f"n_prompts = {self.n_prompts} must be at least 1")
        require(self.max_tokens >= 1, f"max_tokens = {self.max_tokens} must be at least 1")


def _str_tokens(model, ids: list[int]) -> list[str]:
    return model.to_str_tokens(ids) if model.tokenizer is not None else [str(i) for i in ids]


@register("attention.patterns", PatternParams, "every head's attention pattern on the task's first prompts, for viewing",
          Outputs((Metric("attn_entropy", "mean entropy of the head's attention rows (nats)"),),
                  tensors={"pattern": ("prompt", "layer", "head", "query", "key")}))
@torch.no_grad()
def attention_patterns(model, task, params: PatternParams, ctx) -> Result:
    n = min(params.n_prompts, len(task))
    tokens, lengths = task.tokens("clean", device=model.device)
    tokens, lengths = tokens[:n], lengths[:n]
    width = int(lengths.max())
    if width > params.max_tokens:
        raise WorkbenchError(f"prompts are up to {width} tokens, over max_tokens = {params.max_tokens}: stored patterns grow "
                             "with the square of the length; raise max_tokens or use shorter prompts")
    patterns = torch.zeros(n, model.n_layers, model.n_heads, width, width)
    entropy = torch.zeros(model.n_layers, model.n_heads)

    def keep(layer, pattern, valid, rows, queries):
        p = pattern.float() * valid[:, None, queries, None]
        patterns[rows, layer, :, queries, : p.shape[-1]] = p.cpu()
        ent = -(p * p.clamp(min=1e-12).log()).sum(-1)  # [batch, head, query]
        entropy[layer] += (ent.sum(-1) / valid.sum(-1, keepdim=True)).sum(0).cpu()

    for_each_pattern(model, tokens, lengths, keep, batch_size=n)
    frame = head_frame(model, entropy / n, "attn_entropy")
    meta = {"tokens": [_str_tokens(model, task.clean[i]) for i in range(n)],
            "tensor_dims": {"pattern": ["prompt", "layer", "head", "query", "key"]}}
    return Result(pd.DataFrame(frame), tensors={"pattern": patterns}, meta=meta)
