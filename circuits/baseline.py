"""`logit_diff`: the task's metric on clean and corrupted prompts, the baseline every patching
result is normalised against (0 = corrupted, 1 = clean)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from workbench.errors import WorkbenchError
from workbench.methods import register
from workbench.metrics import logit_diff
from workbench.result import Result


@dataclass
class LogitDiffParams:
    batch_size: int = 32


@register("logit_diff", LogitDiffParams, "logit(answer) - logit(wrong) per prompt on clean and corrupted runs, and their means")
@torch.no_grad()
def logit_diff_method(model, task, params: LogitDiffParams) -> Result:
    if params.batch_size < 1:
        raise WorkbenchError("batch_size must be at least 1")
    rows = []
    for which in ("clean", "corrupted"):
        tokens, lengths = task.tokens(which, device=model.device)
        values = []
        for start in range(0, len(task), params.batch_size):
            sl = slice(start, start + params.batch_size)
            logits = model(tokens[sl, : int(lengths[sl].max())])
            values.append(logit_diff(logits, lengths[sl], task.answer_ids()[sl], task.wrong_ids()[sl]).cpu())
        per_prompt = pd.concat([pd.Series(v.numpy()) for v in values], ignore_index=True)
        rows += [dict(component="model", metric=f"logit_diff_{which}", value=float(v), prompt=i) for i, v in enumerate(per_prompt)]
        rows.append(dict(component="model", metric=f"logit_diff_{which}_mean", value=float(per_prompt.mean()), prompt=None))
    frame = pd.DataFrame(rows)
    frame["prompt"] = frame["prompt"].astype("Int64")
    return Result(frame)
