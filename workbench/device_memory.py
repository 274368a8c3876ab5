"""How many bytes one batch may hold: on a CUDA device a share of the memory free right now, so
batches fill whatever card runs them; on the CPU a fixed budget (there memory is plentiful and a
batch much larger than the caches is no faster)."""

from __future__ import annotations

import torch


def memory_budget(device, cpu_bytes: int, share: float = 0.5) -> int:
    """Bytes a batch may use on `device`: `share` of the free CUDA memory, else `cpu_bytes`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * share))
    return cpu_bytes


def forward_bytes_per_token(cfg, n_keys: int) -> int:
    """Peak bytes a token holds in a gradient-free forward, inside one layer: residual copies, the
    MLP's hidden units and every head's attention scores and pattern against `n_keys` keys."""
    width = torch.finfo(cfg.dtype).bits // 8
    return width * (6 * cfg.d_model + 3 * (cfg.d_mlp or 0) + 4 * cfg.n_heads * cfg.d_head + 3 * cfg.n_heads * n_keys)


def backward_bytes_per_token(cfg, n_keys: int, patterns: bool = True) -> int:
    """Bytes a token's saved activations hold, in one layer, until a backward reaches them: the
    norms' float32 copies, the MLP's hidden units, q/k/v and, unless attention runs fused
    (`patterns=False`: `circuits.sdpa_attention` saves no pattern), every head's pattern against
    `n_keys` keys (measured with saved-tensor hooks on the embedded model: 33 kB + 80 B a key in
    float32, 23 kB + 45 B in bfloat16, at most this)."""
    width = torch.finfo(cfg.dtype).bits // 8
    saved = 4 * (6 * cfg.d_model + 3 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * cfg.d_head)
    return saved + (cfg.n_heads * n_keys * (2 * width + 2) if patterns else 4 * cfg.n_heads)
