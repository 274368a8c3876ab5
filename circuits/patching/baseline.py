"""`logit_diff`: the task's metric on clean and corrupted prompts, the baseline every patching
result is normalised against (0 = corrupted, 1 = clean)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from workbench.methods import Metric, Outputs, register
from workbench.metrics import logit_diff
from workbench.params import require
from workbench.result import Result
from workbench.fast_forward.attention import fused_attention


@dataclass(frozen=True)
class LogitDiffParams:
    batch_size: int = 32

    def __post_init__(self):
        require(self.batch_size >= 1, f"batch_size = {self.batch_size} must be at least 1")


OUTPUTS = Outputs(tuple(
    m for which in ("clean", "corrupted") for m in (
        Metric(f"logit_diff_{which}", f"logit(answer) - logit(wrong) on each {which} prompt", "model", ("prompt",), "detail"),
        Metric(f"logit_diff_{which}_mean", f"mean logit difference over the {which} prompts", "model", (), "summary"),
    )
))


@register("logit_diff", LogitDiffParams, "logit(answer) - logit(wrong) per prompt on clean and corrupted runs, and their means",
          OUTPUTS)
@torch.no_grad()
@fused_attention
def logit_diff_method(model, task, params: LogitDiffParams, ctx) -> Result:
    rows = []
    for which in ("clean", "corrupted"):
        tokens, lengths = task.tokens(which, device=model.device)
        values = []
        for start in range(0, len(task), params.batch_size):
            sl = slice(start, start + params.batch_size)
            logits = model.tl(tokens[sl, : int(lengths[sl].max())])
            values.append(logit_diff(logits, lengths[sl], task.answer_ids()[sl], task.wrong_ids()[sl]).cpu())
        per_prompt = pd.concat([pd.Series(v.numpy()) for v in values], ignore_index=True)
        rows += [dict(component="model", metric=f"logit_diff_{which}", value=float(v), prompt=i) for i, v in enumerate(per_prompt)]
        rows.append(dict(component="model", metric=f"logit_diff_{which}_mean", value=float(per_prompt.mean()), prompt=None))
    frame = pd.DataFrame(rows)
    frame["prompt"] = frame["prompt"].astype("Int64")
    return Result(frame)
