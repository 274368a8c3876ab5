"""Node names of a model's computational graph, spelled one way everywhere: frames, job files,
figures, URLs, logs.

    embed        the token (and positional) embeddings
    L5H3         attention head 3 of layer 5
    L5KV1        key/value head 1 of layer 5, under grouped-query attention (shared by its group)
    MLP5         the MLP of layer 5
    logits       the unembedding

An edge's destination input is one of `DST_INPUTS`: a head's query, key or value, an MLP's input,
or the logits. Syntax is checked here without a model (job files are refused when read); ranges
are checked against a model by `parse_heads` / `check_node`.
"""

from __future__ import annotations

import re

from workbench.errors import WorkbenchError

HEAD_RE = re.compile(r"^L(\d+)H(\d+)$")
KV_RE = re.compile(r"^L(\d+)KV(\d+)$")
MLP_RE = re.compile(r"^MLP(\d+)$")
DST_INPUTS = ("q", "k", "v", "mlp", "logits")


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def kv_name(layer: int, kv_head: int) -> str:
    return f"L{int(layer)}KV{int(kv_head)}"


def mlp_name(layer: int) -> str:
    return f"MLP{int(layer)}"


def parse_node(name: str) -> tuple[str, int | None, int | None]:
    """(kind, layer, head) of a node name: ("head", 5, 3), ("mlp", 5, None), ("embed"|"logits", None, None)."""
    if name in ("embed", "logits"):
        return name, None, None
    if m := HEAD_RE.match(name):
        return "head", int(m[1]), int(m[2])
    if m := MLP_RE.match(name):
        return "mlp", int(m[1]), None
    if m := KV_RE.match(name):
        return "kv_head", int(m[1]), int(m[2])
    raise WorkbenchError(f"'{name}' is not a node name; write L<layer>H<head> (e.g. L5H3), L<layer>KV<kv head>, "
                         "MLP<layer>, embed or logits")


def check_head_names(heads) -> None:
    """Refuse malformed head names before anything runs (no model needed)."""
    if heads is None:
        return
    if len(heads) == 0:
        raise WorkbenchError("heads is an empty list; name heads like \"L5H3\" or leave it out for all heads")
    for name in heads:
        if not isinstance(name, str) or not HEAD_RE.match(name):
            raise WorkbenchError(f"'{name}' is not a head name; write heads as L<layer>H<head>, e.g. L5H3")


def parse_heads(model, heads, n_heads: int | None = None) -> list[tuple[int, int]]:
    """`None` means every head; otherwise names like "L5H3", each checked against the model.

    `n_heads` overrides the head count (key/value heads under grouped-query attention)."""
    n_heads = n_heads or model.n_heads
    if heads is None:
        return [(layer, h) for layer in range(model.n_layers) for h in range(n_heads)]
    check_head_names(heads)
    out = []
    for name in heads:
        _, layer, head = parse_node(name)
        if layer >= model.n_layers or head >= n_heads:
            raise WorkbenchError(
                f"head {name} is outside the model ({model.n_layers} layers x {n_heads} heads: L0H0..L{model.n_layers - 1}H{n_heads - 1})"
            )
        out.append((layer, head))
    return out
