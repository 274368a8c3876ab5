"""Parse head names (`L5H3`) given by users, refusing ones outside the model."""

from __future__ import annotations

import re

from workbench.errors import WorkbenchError

HEAD_RE = re.compile(r"^L(\d+)H(\d+)$")


def parse_heads(model, heads: list[str] | None, n_heads: int | None = None) -> list[tuple[int, int]]:
    """`None` means every head; otherwise names like "L5H3", each checked against the model.

    `n_heads` overrides the head count (key/value heads under grouped-query attention)."""
    n_heads = n_heads or model.n_heads
    if heads is None:
        return [(layer, h) for layer in range(model.n_layers) for h in range(n_heads)]
    if not heads:
        raise WorkbenchError("heads is an empty list; name heads like \"L5H3\" or leave it out for all heads")
    out = []
    for name in heads:
        m = HEAD_RE.match(name)
        if not m:
            raise WorkbenchError(f"'{name}' is not a head name; write heads as L<layer>H<head>, e.g. L5H3")
        layer, head = int(m[1]), int(m[2])
        if layer >= model.n_layers or head >= n_heads:
            raise WorkbenchError(
                f"head {name} is outside the model ({model.n_layers} layers x {n_heads} heads: L0H0..L{model.n_layers - 1}H{n_heads - 1})"
            )
        out.append((layer, head))
    return out
