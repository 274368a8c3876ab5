"""Exact activation patching, fast: one engine, many thin sweeps (as TransformerLens's patching.py).

Denoising patches clean activations into the corrupted run, noising corrupted activations into
the clean run; metrics are normalised so 0 = corrupted baseline and 1 = clean baseline.

Why it is faster than TransformerLens's loop (one full forward per patched index) with
identical results:
- every patched run starts at the patched layer from the base run's cached residual
  (`start_at_layer`), and all patches of one layer run in one batch;
- a patch at position p cannot change earlier positions (causal attention), so by-position
  patches compute only positions p.. and read earlier keys and values from the base run
  (a frozen TransformerLens KV cache);
- the final norm and unembedding run only at each prompt's last token, where metrics read;
- batches are chunked so memory stays bounded for long prompts (on a GPU, chunks as large as
  half its free memory holds, so short prompts still fill it);
- patches of several layers or positions share one forward where launching a forward costs more
  than the arithmetic sharing adds (`circuits.patching.groups`: a GPU and short prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from workbench.progress import tqdm

from workbench.fast_forward.own_hooks import own_hooks
from circuits.patching.groups import Piece, plan
from workbench.fast_forward.attention import sdpa_attention
from workbench.device_memory import forward_bytes_per_token, memory_budget
from workbench.device_speed import layer_flops, matmul_rate, seconds
from workbench.errors import WorkbenchError

# activation -> (hook name template, index kind)
ACTIVATIONS = {
    "resid_pre": ("blocks.{}.hook_resid_pre", "pos"),
    "resid_mid": ("blocks.{}.hook_resid_mid", "pos"),
    "resid_post": ("blocks.{}.hook_resid_post", "pos"),
    "attn_out": ("blocks.{}.hook_attn_out", "pos"),
    "mlp_out": ("blocks.{}.hook_mlp_out", "pos"),
    "z": ("blocks.{}.attn.hook_z", "head"),
    "q": ("blocks.{}.attn.hook_q", "head"),
    "k": ("blocks.{}.attn.hook_k", "kv_head"),
    "v": ("blocks.{}.attn.hook_v", "kv_head"),
    "pattern": ("blocks.{}.attn.hook_pattern", "pattern"),
    # a key or value as one query head sees it (under grouped-query attention the key/value head
    # is shared by its group; these patch it for a single query head): patched where it is used
    "k_per_query": ("blocks.{}.attn.hook_attn_scores", "k_per_query"),
    "v_per_query": ("blocks.{}.attn.hook_z", "v_per_query"),
}
CPU_CHUNK_TOKENS = 16384  # tokens per patched batch on the CPU (measured fastest on the embedded model)
METRICS = ("logit_diff", "prob", "logprob", "kl")
DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class PatchIndex:
    """One patch: layer, position (None = all positions) and head (None for layer-level activations)."""

    layer: int
    pos: int | None = None
    head: int | None = None


def hook_name(activation: str, layer: int) -> str:
    """Where a patch of `activation` is written."""
    return ACTIVATIONS[activation][0].format(layer)


def source_hook(model, activation: str, layer: int) -> str:
    """Where the patched-in values are read from the source run."""
    if activation == "k_per_query":
        rotary = model.cfg.positional_embedding_type == "rotary"
        return f"blocks.{layer}.attn.hook_{'rot_k' if rotary else 'k'}"
    if activation == "v_per_query":
        return f"blocks.{layer}.attn.hook_v"
    return hook_name(activation, layer)


def _set(act: Tensor, src: Tensor, kind: str, idx: PatchIndex, offset: int) -> None:
    """Write the source activation into `act` at `idx`, in place; positions are relative to `offset`."""
    p = None if idx.pos is None else idx.pos - offset
    if kind == "pos":
        if p is None:
            act[:] = src
        else:
            act[:, p] = src[:, p]
    elif kind in ("head", "kv_head"):
        if p is None:
            act[:, :, idx.head] = src[:, :, idx.head]
        else:
            act[:, p, idx.head] = src[:, p, idx.head]
    else:  # pattern: [batch, head, query, key]; by position means the query (destination) position
        if p is None:
            act[:, idx.head] = src[:, idx.head]
        else:
            act[:, idx.head, p] = src[:, idx.head, p]


def unembed_final(tl, resid: Float[Tensor, "... pos d_model"]) -> Float[Tensor, "... pos d_vocab"]:
    """Final norm (when the model has one) and unembedding of a residual stream."""
    if tl.cfg.normalization_type is not None:
        resid = tl.ln_final(resid)
    return tl.unembed(resid)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def metric_values(metric: str, final_logits: Float[Tensor, "batch vocab"], answers: Int[Tensor, "batch"],
                  wrongs: Int[Tensor, "batch"], clean_logprobs: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch"]:
    """The per-prompt metric at the final token (in float32 whatever the model's dtype)."""
    final_logits = final_logits.float()
    idx = torch.arange(final_logits.shape[0], device=final_logits.device)
    if metric == "logit_diff":
        return final_logits[idx, answers] - final_logits[idx, wrongs]
    logprobs = final_logits.log_softmax(-1)
    if metric == "logprob":
        return logprobs[idx, answers]
    if metric == "prob":
        return logprobs[idx, answers].exp()
    if metric == "kl":  # KL(clean || patched): 0 when the output equals the clean run's
        return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)
    raise WorkbenchError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")


@dataclass
class Baselines:
    clean: float
    corrupted: float

    def normalise(self, value: Tensor) -> Tensor:
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-9:
            raise WorkbenchError(
                "the metric is the same on clean and corrupted prompts, so patching effects cannot be normalised; "
                "check that the corrupted prompts actually change the answer"
            )
        return (value - self.corrupted) / gap


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------


class PatchingRun:
    """Cached clean and corrupted runs of one task, and batched patched runs on top of them."""

    def __init__(self, model, task, metric: str = "logit_diff", direction: str = "denoise",
                 activations: tuple[str, ...] = tuple(ACTIVATIONS)):
        if metric not in METRICS:
            raise WorkbenchError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
        if direction not in DIRECTIONS:
            raise WorkbenchError(f"unknown direction '{direction}'; choose 'denoise' (clean into corrupted) or 'noise'")
        self.model, self.task, self.metric, self.direction = model, task, metric, direction
        tl = model.tl
        device = model.device
        self.clean_tokens, self.lengths = task.tokens("clean", device=device)
        self.corrupt_tokens, _ = task.tokens("corrupted", device=device)
        self.answers, self.wrongs = task.answer_ids(device), task.wrong_ids(device)
        unknown = [a for a in activations if a not in ACTIVATIONS]
        if unknown:
            raise WorkbenchError(f"unknown activation(s) {unknown}; choose from {', '.join(ACTIVATIONS)}")
        self.activations = tuple(activations)
        # only what patched runs read: the base run's residual and keys/values, and the patched activations
        names = {f"blocks.{layer}.{n}" for layer in range(model.n_layers)
                 for n in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")}
        names |= {source_hook(model, a, layer) for a in activations for layer in range(model.n_layers)}
        names = {n for n in names if n in tl.hook_dict}
        with torch.no_grad(), sdpa_attention(tl):
            clean_logits, self.clean_cache = tl.run_with_cache(self.clean_tokens, names_filter=lambda n: n in names)
            corrupt_logits, self.corrupt_cache = tl.run_with_cache(self.corrupt_tokens, names_filter=lambda n: n in names)
        self.final_idx = self.lengths - 1
        rows = torch.arange(len(task), device=device)
        clean_final, corrupt_final = clean_logits[rows, self.final_idx], corrupt_logits[rows, self.final_idx]
        self.clean_logprobs = clean_final.float().log_softmax(-1)
        clean_v = self._values(clean_final)
        corrupt_v = self._values(corrupt_final)
        self.baselines = Baselines(clean_v.mean().item(), corrupt_v.mean().item())
        denoise = direction == "denoise"
        self.base_cache = self.corrupt_cache if denoise else self.clean_cache
        self.source_cache = self.clean_cache if denoise else self.corrupt_cache
        self.base_final = corrupt_final if denoise else clean_final

    def _values(self, final_logits: Tensor, repeats: int = 1) -> Tensor:
        return metric_values(self.metric, final_logits, self.answers.repeat(repeats), self.wrongs.repeat(repeats),
                             self.clean_logprobs.repeat(repeats, 1))

    def _kv_prefix(self, start_layer: int, offset: int, copies: int):
        """A frozen KV cache holding the base run's keys and values before `offset`, `copies` times."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cfg = self.model.cfg
        cache = TransformerLensKeyValueCache.init_cache(cfg, self.model.device, batch_size=len(self.task) * copies)
        for layer in range(start_layer, cfg.n_layers):
            entry = cache.entries[layer]
            entry.past_keys = self.base_cache[f"blocks.{layer}.attn.hook_k"][:, :offset].repeat(copies, 1, 1, 1)
            entry.past_values = self.base_cache[f"blocks.{layer}.attn.hook_v"][:, :offset].repeat(copies, 1, 1, 1)
        cache.freeze()
        return cache

    @torch.no_grad()
    def run(self, activation: str, indices: list[PatchIndex], chunk_tokens: int | None = None,
            progress: bool = True, merge: bool | None = None) -> Tensor:
        """The batch-mean metric (unnormalised) for each patch index, in order; patched runs go in
        chunks of at most `chunk_tokens` tokens (default: what the device's memory holds). Patches
        of different layers or positions share a forward (`circuits.patching.groups`) wherever the
        tokens fit (`merge=True`), never (`False`), or by default where this device's measured costs
        say it is faster: on a GPU only (on the CPU arithmetic outweighs a forward's fixed cost even
        for short prompts: sharing was measured slower). Results are the same up to float rounding."""
        if activation not in self.activations:
            raise WorkbenchError(f"activation '{activation}' was not cached for this run; cached: {', '.join(self.activations)}")
        kind = ACTIVATIONS[activation][1]
        out = torch.empty(len(indices))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, idx in enumerate(indices):
            groups.setdefault((idx.layer, idx.pos or 0), []).append(i)
        batch, n_pos = self.clean_tokens.shape
        if chunk_tokens is None:
            per_token = forward_bytes_per_token(self.model.cfg, n_pos)
            chunk_tokens = memory_budget(self.model.device, CPU_CHUNK_TOKENS * per_token) // per_token
        pieces = []
        for (layer, offset), members in groups.items():
            size = max(1, chunk_tokens // max(1, batch * (n_pos - offset)))
            pieces += [Piece(layer, offset, tuple(members[s : s + size])) for s in range(0, len(members), size)]
        bar = tqdm(total=len(indices), desc=f"patching {activation}", disable=not progress, leave=False)
        for forward in self._plan(kind, pieces, chunk_tokens, merge):
            members = [i for piece in forward for i in piece.members]
            out[members] = self._run_forward(activation, kind, forward, [indices[i] for i in members]).cpu()
            bar.update(len(members))
        bar.close()
        return out

    def _plan(self, kind: str, pieces: list[Piece], chunk_tokens: int, merge: bool | None) -> list[list[Piece]]:
        on_gpu = torch.device(self.model.device).type == "cuda"
        if merge is False or (merge is None and not on_gpu) or kind in ("k_per_query", "v_per_query") or len(pieces) < 2:
            return [[piece] for piece in pieces]
        batch, n_pos = self.clean_tokens.shape
        fixed, per_token = (1.0, 0.0) if merge else self._forward_costs()
        return plan(pieces, self.model.n_layers, lambda offset: batch * (n_pos - offset), chunk_tokens, fixed, per_token)

    def _forward_costs(self) -> tuple[float, float]:
        """(seconds a layer of a patched forward costs whatever its size, seconds a token adds to a
        layer), measured once per run: a one-token forward's time (on a GPU, the host launching
        it), and the token's arithmetic at this device's measured matmul rate (a lower bound)."""
        if not hasattr(self, "_costs"):
            tl, cfg, n_layers = self.model.tl, self.model.cfg, self.model.n_layers
            x = self.base_cache["blocks.0.hook_resid_pre"][:1, :1]

            def forward():
                with own_hooks(tl, [("blocks.0.hook_resid_pre", lambda act, hook: act)]), sdpa_attention(tl):
                    tl(x, start_at_layer=0, stop_at_layer=n_layers)

            fixed = seconds(forward, self.model.device) / n_layers
            self._costs = fixed, layer_flops(cfg, self.clean_tokens.shape[1] / 2) / matmul_rate(self.model.device, cfg.dtype)
        return self._costs

    def _run_forward(self, activation: str, kind: str, pieces: list[Piece], chunk: list[PatchIndex]) -> Tensor:
        """One forward holding `chunk`'s patches as copies of the batch, from the pieces' first layer
        and position; each patch is written at its own layer."""
        tl, batch, n = self.model.tl, len(self.task), len(chunk)
        layer, offset = min(p.layer for p in pieces), min(p.offset for p in pieces)
        if kind in ("k_per_query", "v_per_query"):
            hooks = self._per_query_hooks(activation, layer, offset, chunk)
        else:
            at: dict[int, list[tuple[int, PatchIndex]]] = {}
            for j, idx in enumerate(chunk):
                at.setdefault(idx.layer, []).append((j, idx))
            hooks = [(hook_name(activation, l), self._patch_hook(activation, kind, l, offset, n, members))
                     for l, members in at.items()]
        x = self.base_cache[f"blocks.{layer}.hook_resid_pre"][:, offset:].repeat(n, 1, 1)
        kv = self._kv_prefix(layer, offset, n) if offset > 0 else None
        with own_hooks(tl, hooks), sdpa_attention(tl):
            resid = tl(x, start_at_layer=layer, stop_at_layer=self.model.n_layers, past_kv_cache=kv)
        final = self.final_idx.repeat(n)
        patched_at = torch.tensor([idx.pos or 0 for idx in chunk], device=final.device).repeat_interleave(batch)
        reached = final >= patched_at  # prompts that end before their patch's position are unchanged
        rows = torch.arange(n * batch, device=resid.device)
        last = resid[rows, (final - offset).clamp(min=0)]
        logits = unembed_final(tl, last[:, None, :])[:, 0]
        logits = torch.where(reached[:, None], logits, self.base_final.repeat(n, 1))
        return self._values(logits, n).view(n, batch).mean(1)

    def _patch_hook(self, activation: str, kind: str, layer: int, offset: int, n: int,
                    members: list[tuple[int, PatchIndex]]):
        """A hook writing the source activation into copy j for each (j, patch) of `members`."""
        src = self.source_cache[hook_name(activation, layer)]
        src = src[:, :, offset:] if kind == "pattern" else src[:, offset:]
        batch = len(self.task)

        def hook(act, hook):
            view = act.view(n, batch, *act.shape[1:])
            for j, idx in members:
                _set(view[j], src, kind, idx, offset)
            return act

        return hook

    def _per_query_hooks(self, activation: str, layer: int, offset: int, chunk: list[PatchIndex]):
        """Hooks patching one query head's view of a key or value: its attention scores against the
        source key (re-masked), or its output recomputed with the source value."""
        model, batch, n = self.model, len(self.task), len(chunk)
        group = model.n_heads // model.n_kv_heads
        src = self.source_cache[source_hook(model, activation, layer)]  # [batch, pos, kv_head, d_head]
        seen: dict[str, Tensor] = {}

        def capture(act, hook):
            seen[hook.name.rsplit(".", 1)[-1]] = act
            return act

        if activation == "k_per_query":
            q_name = "hook_rot_q" if model.cfg.positional_embedding_type == "rotary" else "hook_q"
            scale = model.tl.blocks[layer].attn.attn_scale

            def scores(act, hook):  # [n*batch, head, query, key], queries at offset..
                view = act.view(n, batch, *act.shape[1:])
                q = seen[q_name].view(n, batch, *seen[q_name].shape[1:])  # [n, batch, query, head, d]
                n_q, n_k = act.shape[-2], act.shape[-1]
                future = torch.arange(n_k, device=act.device)[None, :] > (offset + torch.arange(n_q, device=act.device))[:, None]
                for j, idx in enumerate(chunk):
                    k = src[:, :, idx.head // group]  # [batch, key, d]
                    if idx.pos is None:
                        new = torch.einsum("bqd,bkd->bqk", q[j, :, :, idx.head], k) / scale
                        view[j, :, idx.head] = new.masked_fill(future, float("-inf"))
                    else:
                        view[j, :, idx.head, :, idx.pos] = torch.einsum("bqd,bd->bq", q[j, :, :, idx.head], k[:, idx.pos]) / scale
                return act

            return [(f"blocks.{layer}.attn.{q_name}", capture), (f"blocks.{layer}.attn.hook_attn_scores", scores)]

        def z_hook(act, hook):  # [n*batch, query, head, d]
            view = act.view(n, batch, *act.shape[1:])
            pattern = seen["hook_pattern"].view(n, batch, *seen["hook_pattern"].shape[1:])  # [n, batch, head, q, k]
            current = seen["hook_v"].view(n, batch, *seen["hook_v"].shape[1:])  # [n, batch, new pos, kv_head, d]
            for j, idx in enumerate(chunk):
                kvh = idx.head // group
                if idx.pos is None:
                    view[j, :, :, idx.head] = torch.einsum("bqk,bkd->bqd", pattern[j, :, idx.head], src[:, :, kvh])
                else:
                    delta = src[:, idx.pos, kvh] - current[j, :, idx.pos - offset, kvh]  # [batch, d]
                    view[j, :, :, idx.head] += pattern[j, :, idx.head, :, idx.pos, None] * delta[:, None, :]
            return act

        return [(f"blocks.{layer}.attn.hook_v", capture), (f"blocks.{layer}.attn.hook_pattern", capture),
                (f"blocks.{layer}.attn.hook_z", z_hook)]


# ---------------------------------------------------------------------------------------------
# index sets for the standard sweeps
# ---------------------------------------------------------------------------------------------


def layer_pos_indices(model, n_pos: int, by_position: bool = True) -> list[PatchIndex]:
    positions: Iterable[int | None] = range(n_pos) if by_position else [None]
    return [PatchIndex(layer, pos) for layer in range(model.n_layers) for pos in positions]


def head_indices(model, activation: str, n_pos: int, by_position: bool,
                 heads: list[tuple[int, int]] | None = None) -> list[PatchIndex]:
    n_heads = model.n_kv_heads if ACTIVATIONS[activation][1] == "kv_head" else model.n_heads
    chosen = heads if heads is not None else [(layer, h) for layer in range(model.n_layers) for h in range(n_heads)]
    positions: Iterable[int | None] = range(n_pos) if by_position else [None]
    return [PatchIndex(layer, pos, h) for layer, h in chosen for pos in positions]
