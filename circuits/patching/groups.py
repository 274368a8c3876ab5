"""Which patched runs share a forward.

Exact patching runs the patches of one (layer, position) as copies of the batch in one forward from
that layer and position. A forward has a fixed cost per layer (on a GPU, the host launching ~30
kernels: ~35 ms for a by-position group on an H100 with the embedded model's shape, whatever its
size) beside its arithmetic. Copies of another group can join a forward that starts at an earlier
layer or position: the layers and positions before their own patch compute what the base run
already holds (unchanged by causality), which costs arithmetic but no launches. `plan` joins groups
while the arithmetic this adds costs less than the forwards it saves, and the memory budget allows,
so on a GPU a short prompt's sweep runs in a few forwards instead of one per (layer, position). (On
a CPU arithmetic dominates: patching runs groups apart there unless told otherwise.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Patches (indices into the run's list) of one layer and position, run as copies of the batch."""

    layer: int
    offset: int
    members: tuple[int, ...]


def cost(pieces: list[Piece], n_layers: int, tokens_per_copy, layer_fixed_s: float, token_layer_s: float) -> float:
    """Seconds of one forward holding `pieces`: from their first layer and position, every copy."""
    start, offset = min(p.layer for p in pieces), min(p.offset for p in pieces)
    tokens = sum(len(p.members) for p in pieces) * tokens_per_copy(offset)
    return (n_layers - start) * (layer_fixed_s + tokens * token_layer_s)


def plan(pieces: list[Piece], n_layers: int, tokens_per_copy, max_tokens: int, layer_fixed_s: float,
         token_layer_s: float) -> list[list[Piece]]:
    """Forwards, each a list of pieces: pieces in order of layer and position, each joining the
    forward before it when that is cheaper than a forward of its own and the tokens fit."""
    forwards: list[list[Piece]] = []
    for piece in sorted(pieces, key=lambda p: (p.layer, p.offset)):
        if forwards:
            last, joined = forwards[-1], forwards[-1] + [piece]
            offset = min(p.offset for p in joined)
            fits = sum(len(p.members) for p in joined) * tokens_per_copy(offset) <= max_tokens
            args = (n_layers, tokens_per_copy, layer_fixed_s, token_layer_s)
            if fits and cost(joined, *args) < cost(last, *args) + cost([piece], *args):
                last.append(piece)
                continue
        forwards.append([piece])
    return forwards
