"""Metrics on a task's logits, read at each prompt's own last token (prompts may be padded)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def last_token_logits(logits: Float[Tensor, "batch pos vocab"], lengths: Int[Tensor, "batch"]) -> Float[Tensor, "batch vocab"]:
    """In float32 whatever the model's dtype: metrics are computed in full precision."""
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths.to(logits.device) - 1].float()


def logit_diff(
    logits: Float[Tensor, "batch pos vocab"], lengths: Int[Tensor, "batch"], answers: Int[Tensor, "batch"], wrongs: Int[Tensor, "batch"]
) -> Float[Tensor, "batch"]:
    """logit(answer) - logit(wrong) at each prompt's last token."""
    last = last_token_logits(logits, lengths)
    idx = torch.arange(last.shape[0], device=last.device)
    return last[idx, answers.to(last.device)] - last[idx, wrongs.to(last.device)]
