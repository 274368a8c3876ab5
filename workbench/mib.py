"""A circuit in the layout the MIB circuit track reads (the EAP-IG library's graph JSON): `cfg`,
`nodes` ({"input", "a5.h3", "m5", "logits"} -> in_graph) and `edges` ("a0.h1->a2.h3<q>",
"input->m0", "m3->logits" -> score, in_graph).

That layout has a query, key and value input per query head; under grouped-query attention our
graph has one key and one value input per key/value head (`L5KV1`), so each such edge is written
for every query head of its group, with the same score.
"""

from __future__ import annotations

from typing import Any

from workbench.errors import WorkbenchError
from workbench.nodes import parse_node


def _mib_node(name: str) -> str:
    kind, layer, head = parse_node(name)
    return {"embed": "input", "logits": "logits", "mlp": f"m{layer}"}.get(kind) or f"a{layer}.h{head}"


def mib_circuit(rows: list[dict[str, Any]], shape: dict[str, Any]) -> dict[str, Any]:
    """rows: edges (src, dst, dst_input, value); shape: the model's n_layers, n_heads, n_kv_heads, d_model."""
    if not rows:
        raise WorkbenchError("the run has no edge scores; export a discovery run (discovery.eap, discovery.eap_ig, discovery.eap_ig_activations) as mib-json")
    group = shape["n_heads"] // (shape.get("n_kv_heads") or shape["n_heads"])
    edges: dict[str, dict[str, Any]] = {}
    nodes = {"input": {"in_graph": True}, "logits": {"in_graph": True}}
    for r in rows:
        src = _mib_node(r["src"])
        kind, layer, head = parse_node(r["dst"])
        if kind == "kv_head":
            dsts = [f"a{layer}.h{h}<{r['dst_input']}>" for h in range(head * group, (head + 1) * group)]
        elif kind == "head":
            dsts = [f"a{layer}.h{head}<{r['dst_input']}>"]
        else:
            dsts = [_mib_node(r["dst"])]
        for dst in dsts:
            edges[f"{src}->{dst}"] = {"score": float(r["value"]), "in_graph": True}
        nodes[src] = {"in_graph": True}
    for layer in range(shape["n_layers"]):
        for h in range(shape["n_heads"]):
            nodes.setdefault(f"a{layer}.h{h}", {"in_graph": False})
        nodes.setdefault(f"m{layer}", {"in_graph": False})
    cfg = {"n_layers": shape["n_layers"], "n_heads": shape["n_heads"], "parallel_attn_mlp": False, "d_model": shape.get("d_model")}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}
