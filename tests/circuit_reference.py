"""Edge-level circuit runs the slow way, written apart from circuits/discovery/circuit_run.py.

TransformerLens's own forward, no fused path, with a hook point per query/key/value input
(`use_split_qkv_input`) and on each MLP's input: at each target's hook its input is rebuilt from
scratch as the attention output biases of the layers before it plus, for every source that writes
before it, that source's output in this same run where the edge is kept, and its ablated output
(the corrupted run's, the mean over the corrupted prompts' real positions, or zero) where it is
not. Edges are named (src, dst, dst_input) as `workbench.nodes` names them; nothing here reads the
workbench's graph or its circuit runner.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def split_inputs(tl):
    """TransformerLens with a hook point per q/k/v input and on each MLP's input."""
    tl.set_use_split_qkv_input(True)
    if not tl.cfg.attn_only:
        tl.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        tl.set_use_split_qkv_input(False)
        if not tl.cfg.attn_only:
            tl.set_use_hook_mlp_in(False)


def sources(tl) -> list[tuple[str, int]]:
    """(name, layer it writes in) in the order they write: embed, each layer's heads, its MLP."""
    out = [("embed", -1)]
    for layer in range(tl.cfg.n_layers):
        out += [(f"L{layer}H{h}", layer) for h in range(tl.cfg.n_heads)]
        if not tl.cfg.attn_only:
            out.append((f"MLP{layer}", layer))
    return out


def _outputs_hooks(tl, into: dict):
    """Hooks recording every source's output [batch, pos, d_model] by name into `into`."""
    def embed(act, hook):
        into["embed"] = act.clone()

    def heads(act, hook):
        layer = int(hook.name.split(".")[1])
        w_o = tl.blocks[layer].attn.W_O
        for h in range(tl.cfg.n_heads):
            into[f"L{layer}H{h}"] = act[:, :, h] @ w_o[h]

    def mlp(act, hook):
        into[f"MLP{hook.name.split('.')[1]}"] = act.clone()

    hooks = [("blocks.0.hook_resid_pre", embed)]
    for layer in range(tl.cfg.n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_z", heads))
        if not tl.cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_mlp_out", mlp))
    return hooks


def ablated_outputs(tl, corrupted: torch.Tensor, lengths: torch.Tensor, ablation: str) -> dict:
    """Each source's ablated output, by name: [batch, pos, d_model], or [d_model] for mean and zero."""
    outputs: dict = {}
    with torch.no_grad():
        tl.run_with_hooks(corrupted, fwd_hooks=_outputs_hooks(tl, outputs))
    if ablation == "corrupted":
        return outputs
    real = (torch.arange(corrupted.shape[1], device=corrupted.device)[None, :] < lengths[:, None].to(corrupted.device))
    mean = {k: v[real].double().mean(0).to(v.dtype) for k, v in outputs.items()}
    return mean if ablation == "mean" else {k: torch.zeros_like(v) for k, v in mean.items()}


def circuit_logit_diff(model, task, kept: set[tuple[str, str, str]], ablation: str = "corrupted") -> float:
    """Mean logit difference (answer - wrong, at each prompt's last real token) of the circuit that
    keeps exactly the edges `kept` and ablates every other one."""
    tl, cfg = model.tl, model.tl.cfg
    clean, lengths = task.tokens("clean", device=model.device)
    corrupted, _ = task.tokens("corrupted", device=model.device)
    ablated = ablated_outputs(tl, corrupted, lengths, ablation)
    order = sources(tl)
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv_node = (lambda layer, g: f"L{layer}H{g}") if n_kv == cfg.n_heads else (lambda layer, g: f"L{layer}KV{g}")
    current: dict = {}

    def rebuilt(dst: str, dst_input: str, before) -> torch.Tensor:
        """The target's input: biases of the layers `before` plus each earlier source's kept or ablated output."""
        x = sum((tl.blocks[layer].attn.b_O for layer in before), torch.zeros(cfg.d_model, device=model.device))
        for name, layer in order:
            if layer in before or name == "embed":
                x = x + (current[name] if (name, dst, dst_input) in kept else ablated[name])
        return x

    def attention_inputs(act, hook):
        layer, which = int(hook.name.split(".")[1]), hook.name.split("hook_")[1][0]
        out = act.clone()
        for i in range(act.shape[2]):
            node = f"L{layer}H{i}" if which == "q" else kv_node(layer, i)
            heads_before = [lyr for lyr in range(layer)]
            out[:, :, i] = rebuilt(node, which, heads_before).expand_as(act[:, :, i])
        return out

    def mlp_input(act, hook):
        layer = int(hook.name.split(".")[1])
        # an MLP reads its own layer's heads too
        before = list(range(layer + 1))
        x = sum((tl.blocks[lyr].attn.b_O for lyr in before), torch.zeros(cfg.d_model, device=model.device))
        for name, lyr in order:
            if name == "embed" or lyr < layer or (lyr == layer and not name.startswith("MLP")):
                x = x + (current[name] if (name, f"MLP{layer}", "mlp") in kept else ablated[name])
        return x.expand_as(act).clone()

    def logits_input(act, hook):
        return rebuilt("logits", "logits", list(range(cfg.n_layers))).expand_as(act).clone()

    hooks = _outputs_hooks(tl, current)
    for layer in range(cfg.n_layers):
        hooks += [(f"blocks.{layer}.hook_{x}_input", attention_inputs) for x in "qkv"]
        if not cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_mlp_in", mlp_input))
    hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", logits_input))
    with torch.no_grad(), split_inputs(tl):
        logits = tl.run_with_hooks(clean, fwd_hooks=hooks)
    rows = torch.arange(len(task), device=logits.device)
    last = logits[rows, lengths.to(logits.device) - 1].double()
    answers, wrongs = task.answer_ids(model.device), task.wrong_ids(model.device)
    return (last[rows, answers] - last[rows, wrongs]).mean().item()
