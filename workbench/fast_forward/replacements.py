"""The one way to substitute part of a module's computation so that every fast path honours it.

A caller (a circuit run building each head's query, key and value from its own input; an
intervention) replaces a method on one module instance for the duration of a block (`swapped`).
Every fast path asks `replaced` before it reimplements or skips that method:
- an attention layer's `calculate_qkv_matrices` replaced on the instance computes its queries,
  keys and values whatever path runs: TransformerLens's own forward calls it, and fused attention
  calls it in place of its joint q/k/v product (`workbench.fast_forward.attention`);
- a module whose `forward` is replaced keeps it: fused attention, blocks, gated MLPs and norms
  are not swapped in over it (a first norm's replacement may be called once for the three
  identical inputs of its block);
- an attention layer with any other method the fused forward reimplements replaced
  (`ATTENTION_INTERNALS`) runs TransformerLens's forward.
Before this, the joint product skipped a replaced `calculate_qkv_matrices`, so circuit runs on
every loaded model kept every edge into a query, key or value.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

# what fused attention computes itself instead of calling TransformerLens's method of that name
ATTENTION_INTERNALS = ("apply_rotary", "calculate_attention_scores", "apply_causal_mask", "calculate_z_scores")


def replaced(module, *names: str) -> bool:
    """Whether any of `names` is replaced on this instance (set on it rather than its class)."""
    return any(name in module.__dict__ for name in names)


@contextmanager
def swapped(swaps: list[tuple]) -> Iterator[None]:
    """Within the block, each (module, attribute, replacement) of `swaps` replaces the module's own."""
    before = [(module, name, module.__dict__.get(name)) for module, name, _ in swaps]
    try:
        for module, name, replacement in swaps:
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, value in before:
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)
