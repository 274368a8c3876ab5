"""How many bytes one batch may hold: on a CUDA device a share of the memory free right now, so
batches fill whatever card runs them; on the CPU a fixed budget (there memory is plentiful and a
batch much larger than the caches is no faster)."""

from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


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
    (`patterns=False`: `workbench.fast_forward.attention` saves no pattern), every head's pattern against
    `n_keys` keys (measured with saved-tensor hooks on the embedded model: 33 kB + 80 B a key in
    float32, 23 kB + 45 B in bfloat16, at most this)."""
    width = torch.finfo(cfg.dtype).bits // 8
    saved = 4 * (6 * cfg.d_model + 3 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * cfg.d_head)
    return saved + (cfg.n_heads * n_keys * (2 * width + 2) if patterns else 4 * cfg.n_heads)


def peak_tensor_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """`fn()`'s result and the peak bytes of tensor storage it had alive at once, on any device:
    what `torch.cuda.max_memory_allocated` counts on a GPU (kernels' private workspace aside), also
    on the CPU, where no allocator keeps a peak. Storage made before the call (weights, caches) is
    not counted: an operator's output that shares storage with one of its inputs is a view or a
    write into it, not an allocation."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.alive: dict[int, int] = {}  # storage address -> bytes
            self.now = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key in self.alive or key in inputs or storage.nbytes() == 0:
                    continue
                self.alive[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key)
            return out

        def _freed(self, key: int) -> None:
            self.now -= self.alive.pop(key)

    with Live() as live:
        result = fn()
    return result, live.peak
