"""Plotly figures the dashboard and notebooks share: layer x head maps, attention patterns,
circuit graphs, distance profiles, masking curves. Each takes plain frames/tensors and returns a figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.nodes import head_name


def head_heatmap(grid: pd.DataFrame, title: str, subtitle: str = "") -> go.Figure:
    """A layer x head heatmap; each cell's customdata is its head name (for click-through)."""
    names = np.array([[head_name(layer, h) for h in grid.columns] for layer in grid.index])
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    signed = finite.size and finite.min() < 0
    fig = go.Figure(go.Heatmap(
        z=values, x=list(grid.columns), y=list(grid.index), customdata=names,
        colorscale="RdBu" if signed else "Blues", reversescale=bool(signed),
        zmin=-bound if signed else None, zmax=bound if signed else None,
        hovertemplate="%{customdata}: %{z:.4g}<extra></extra>", xgap=1, ygap=1,
    ))
    fig.update_layout(title=dict(text=title, subtitle=dict(text=subtitle)), xaxis_title="head", yaxis_title="layer",
                      height=max(320, 18 * len(grid.index) + 120),
                      margin=dict(l=40, r=20, t=50, b=40))
    fig.update_yaxes(autorange="reversed", dtick=max(1, len(grid.index) // 10))
    fig.update_xaxes(dtick=1)
    return fig


def pattern_figure(pattern: np.ndarray, tokens: list[str], title: str) -> go.Figure:
    """A head's attention pattern, query rows x key columns, labelled with the tokens."""
    n = len(tokens)
    labels = [f"{i}:{t!r}"[:24] for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=pattern[:n, :n], x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="key (source)", yaxis_title="query (destination)",
                      height=max(360, 16 * n + 160), margin=dict(l=40, r=20, t=50, b=40))
    fig.update_yaxes(autorange="reversed")
    return fig


def distance_figure(hist: np.ndarray, bins: list[str], title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=bins, y=hist, hovertemplate="distance %{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="query - key distance (tokens)", yaxis_title="share of attention",
                      height=320, margin=dict(l=40, r=20, t=50, b=40))
    return fig


def circuit_figure(nodes: pd.DataFrame, edges: pd.DataFrame, n_layers: int, n_heads: int, title: str) -> go.Figure:
    """Nodes (name, layer, head (NaN for MLPs), value) laid out layer by layer left to right;
    edges (src, dst, value) as lines whose width follows |value|."""
    def xy(row):
        return row["layer"], (n_heads if pd.isna(row["head"]) else row["head"])

    pos = {row["name"]: xy(row) for _, row in nodes.iterrows()}
    pos["logits"] = (n_layers, n_heads / 2)
    pos["embed"] = (-1, n_heads / 2)
    fig = go.Figure()
    top = edges["value"].abs().max() if not edges.empty else 1.0
    for _, e in edges.iterrows():
        if e["src"] not in pos or e["dst"] not in pos:
            continue
        (x0, y0), (x1, y1) = pos[e["src"]], pos[e["dst"]]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text",
                                 text=f"{e['src']} -> {e['dst']}: {e['value']:+.3f}", showlegend=False,
                                 line=dict(width=1 + 8 * abs(e["value"]) / (top or 1),
                                           color="#c0392b" if e["value"] > 0 else "#2c7fb8")))
    if not nodes.empty:
        fig.add_trace(go.Scatter(
            x=[pos[n][0] for n in nodes["name"]], y=[pos[n][1] for n in nodes["name"]], mode="markers+text",
            text=nodes["name"], textposition="top center", customdata=nodes["name"],
            marker=dict(size=12 + 24 * nodes["value"].abs() / (nodes["value"].abs().max() or 1),
                        color=nodes["value"], colorscale="RdBu", reversescale=True, cmid=0, showscale=True,
                        line=dict(width=1, color="#333")),
            hovertemplate="%{customdata}: %{marker.color:+.3f}<extra></extra>", showlegend=False))
    fig.add_trace(go.Scatter(x=[n_layers], y=[n_heads / 2], mode="markers+text", text=["logits"],
                             textposition="top center", marker=dict(size=16, color="#555", symbol="square"),
                             hoverinfo="skip", showlegend=False))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="head (MLP on top row)", height=560,
                      margin=dict(l=40, r=20, t=50, b=40))
    if (edges["src"] == "embed").any():
        fig.add_trace(go.Scatter(x=[-1], y=[n_heads / 2], mode="markers+text", text=["embed"], textposition="top center",
                                 marker=dict(size=16, color="#555", symbol="square"), hoverinfo="skip", showlegend=False))
    fig.update_xaxes(range=[-1.5 if (edges["src"] == "embed").any() else -0.5, n_layers + 0.5], dtick=1 if n_layers <= 32 else 2)
    fig.update_yaxes(range=[n_heads + 0.8, -0.8])
    return fig


def faithfulness_figure(curve: pd.DataFrame, fraction: float) -> go.Figure:
    """The stored faithfulness curves (the ranking by |score|, by signed score, and random) over the
    share of edges kept, with the circuit on screen marked."""
    fig = go.Figure()
    for ranking, color in (("absolute", "#c0392b"), ("signed", "#2471a3"), ("random", "#999")):
        part = curve[curve["ranking"] == ranking].sort_values("fraction")
        fig.add_trace(go.Scatter(x=part["fraction"], y=part["value"], mode="lines+markers", name=ranking,
                                 line=dict(color=color), customdata=part["edges"],
                                 hovertemplate="%{x:.3%} of edges (%{customdata} kept): %{y:.3f}<extra></extra>"))
    fig.add_vline(x=fraction, line_dash="dash", annotation_text="this circuit")
    fig.add_hline(y=1, line_dash="dot")
    fig.update_layout(title="Faithfulness (MIB): (m(circuit) - m(none)) / (m(full) - m(none))", height=380,
                      xaxis_title="share of edges kept", yaxis_title="faithfulness", margin=dict(l=40, r=20, t=50, b=40))
    fig.update_xaxes(type="log")
    return fig


def sweep_figure(circuits: pd.DataFrame) -> go.Figure:
    """A sweep's circuits: CPR of each discovery method's ranking, a dot per (task, seed) coloured by
    task, with the random ranking's CPR of the same run as a grey cross."""
    fig = go.Figure()
    palette = ["#c0392b", "#2c7fb8", "#27ae60", "#8e44ad", "#e67e22"]
    for i, (task, part) in enumerate(circuits.groupby("task", sort=True)):
        fig.add_trace(go.Scatter(x=part["discovery"], y=part["cpr"], mode="markers", name=task,
                                 marker=dict(color=palette[i % len(palette)], size=11), customdata=part[["seed", "cmd"]],
                                 hovertemplate="%{x}, seed %{customdata[0]}: CPR %{y:.3f}, CMD %{customdata[1]:.3f}<extra>"
                                               + task + "</extra>"))
    fig.add_trace(go.Scatter(x=circuits["discovery"], y=circuits["cpr_random"], mode="markers", name="random ranking",
                             marker=dict(color="#999", size=9, symbol="x"), hovertemplate="random: CPR %{y:.3f}<extra></extra>"))
    fig.update_layout(title="Circuits of this job: CPR (area under the faithfulness curve; higher is better)", height=420,
                      yaxis_title="CPR", margin=dict(l=40, r=20, t=50, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    return fig


def masking_figure(curve: pd.DataFrame, draws: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy against the number of heads masked: the top-K curve and the random curve (mean over
    draws), each with its 95% bootstrap band over tests, every random draw as a dot, the unmasked
    baseline as a line with its band."""
    fig = go.Figure()
    base = curve[curve["masked"] == "none"]
    if len(base):
        fig.add_hrect(y0=float(base["low"].iloc[0]), y1=float(base["high"].iloc[0]), fillcolor="#999", opacity=0.15, line_width=0)
        fig.add_hline(y=float(base["value"].iloc[0]), line_dash="dot", annotation_text="nothing masked")
    for masked, color, fill in (("retrieval", "#c0392b", "rgba(192,57,43,0.18)"), ("random", "#2c7fb8", "rgba(44,127,184,0.18)")):
        part = curve[curve["masked"] == masked].sort_values("k")
        if part.empty:
            continue
        name = "top-K retrieval heads" if masked == "retrieval" else "K random non-retrieval heads (mean over draws)"
        fig.add_trace(go.Scatter(x=list(part["k"]) + list(part["k"])[::-1], y=list(part["high"]) + list(part["low"])[::-1],
                                 mode="lines", fill="toself", fillcolor=fill, line=dict(width=0), hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(x=part["k"], y=part["value"], mode="lines+markers", name=name, line=dict(color=color),
                                 hovertemplate="K = %{x}: %{y:.2f}<extra></extra>"))
    dots = draws[draws["masked"] == "random"]
    if len(dots):
        fig.add_trace(go.Scatter(x=dots["k"], y=dots["value"], mode="markers", name="one random draw",
                                 marker=dict(color="#2c7fb8", size=6, symbol="circle-open"),
                                 hovertemplate="K = %{x}, draw: %{y:.2f}<extra></extra>"))
    fig.update_layout(title=title, height=400, xaxis_title="heads masked (K)", yaxis_title="needle accuracy",
                      yaxis_range=[-0.05, 1.05], margin=dict(l=40, r=20, t=50, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, x=0))
    return fig


def highlighted_tokens_html(tokens: list[str], acts: list[float], scale: float) -> str:
    """Tokens as HTML spans shaded by a feature's activation (scale = the feature's max)."""
    import html

    spans = []
    for token, act in zip(tokens, acts):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, act / scale))
        text = html.escape(token).replace("\n", "⏎")
        spans.append(f'<span title="{act:.3f}" style="background: rgba(255,140,0,{alpha:.2f}); '
                     f'border-radius: 2px; white-space: pre">{text}</span>')
    return "<div style='font-family: monospace; line-height: 1.8'>" + "".join(spans) + "</div>"


def feature_histogram_figure(counts: np.ndarray, edges: np.ndarray, title: str) -> go.Figure:
    """Counts of a feature's positive activations per log10 bin (the outer bins are open-ended)."""
    labels = [f"< {edges[0]:.2g}"] + [f"{a:.2g}..{b:.2g}" for a, b in zip(edges[:-1], edges[1:])] + [f">= {edges[-1]:.2g}"]
    fig = go.Figure(go.Bar(x=labels, y=counts, hovertemplate="log10 activation %{x}: %{y}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="log10 activation", yaxis_title="tokens", height=300,
                      margin=dict(l=40, r=20, t=50, b=40))
    return fig


def head_attribution_figure(values: np.ndarray, layer: int, title: str) -> go.Figure:
    heads = [head_name(layer, h) for h in range(len(values))]
    fig = go.Figure(go.Bar(x=heads, y=values, customdata=heads, hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, yaxis_title="share of decoder norm", yaxis_range=[0, 1], height=300,
                      margin=dict(l=40, r=20, t=50, b=40))
    return fig


def logit_effect_figure(tokens: list[str], values: np.ndarray, title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=values, y=[repr(t) for t in tokens], orientation="h",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="direct effect on the logit", height=320,
                      margin=dict(l=40, r=20, t=50, b=40))
    fig.update_yaxes(autorange="reversed")
    return fig
