"""What work costs on this device, measured here: the matrix-product rate at a precision, and the
arithmetic of one token through one block. With a forward's fixed (host) time these say whether
running two small batches as one saves more launching than it adds computing: on a GPU a short
batch waits on the host, on a CPU it waits on arithmetic."""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a clock read before this lies)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall-clock time of `fn` over `repeats` runs after `warmup` runs, the device synchronised."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matrix product on `device` at `dtype` (TF32 as the current setting says),
    measured once per process and setting."""
    return _rate(str(torch.device(device)), dtype, torch.backends.cuda.matmul.allow_tf32)


@functools.cache
def _rate(device: str, dtype: torch.dtype, tf32: bool) -> float:
    n = 4096 if torch.device(device).type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds(lambda: a @ b, device)


def layer_flops(cfg, n_keys: float) -> float:
    """Matrix-product FLOPs of one token through one block, attending to `n_keys` keys on average."""
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head
    mlp = 0 if cfg.attn_only else (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp
    return 2 * (d * (h + 2 * kv) * dh + h * dh * d + mlp) + 4 * h * dh * n_keys
