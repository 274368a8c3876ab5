"""The activation cache: one layer's hook_z over a task's prompts, computed once and kept in the
store, so a sweep of SAE sizes or sparsity coefficients costs one model pass, not one per run.

Layout: `<store>/activations/<key[:2]>/<key>/` holds `meta.json` and `shard_00000.safetensors`,
... Each shard has `z` [tokens, n_heads * d_head] (heads concatenated, real positions only, in
prompt order) and, per row, its `token` id, `prompt` index and `position`, so top-activating
examples can be shown in context. The key is the sha256 of (model identity, hook, the task's
spec incl. its token fingerprint, dtype, format version): never a user string. The directory is
written under `tmp/` and renamed into place, so a reader sees a complete cache or none; a per-key
lock makes concurrent sweeps compute it once.

Training reads shard by shard (one shard in memory at a time); `batches` shuffles within a shard
and the shard order per epoch, deterministically from (seed, epoch), so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from workbench.progress import tqdm

from workbench.errors import WorkbenchError
from workbench.store import Store, content_key
from workbench.fast_forward.attention import fused_attention

FORMAT_VERSION = 1
SHARD_TOKENS = 65_536


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


@dataclass(frozen=True)
class ActivationCache:
    """A complete cache on disk: `n_tokens` rows of width `d_in` over `n_prompts` prompts."""

    path: Path
    key: str
    hook: str
    n_tokens: int
    d_in: int
    n_prompts: int
    shards: tuple[str, ...]

    def shard(self, i: int) -> dict[str, Tensor]:
        return load_file(str(self.path / self.shards[i]))

    def load(self, prompts: range | None = None) -> dict[str, Tensor]:
        """Every shard concatenated (optionally only rows of `prompts`): for analysis passes that fit in memory."""
        parts = [self.shard(i) for i in range(len(self.shards))]
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if prompts is not None:
            keep = (out["prompt"] >= prompts.start) & (out["prompt"] < prompts.stop)
            out = {k: v[keep] for k, v in out.items()}
        return out


@torch.no_grad()
@fused_attention
def collect_z(model, task, layer: int, batch_size: int = 8, prompts: range | None = None,
              progress: bool = False) -> Iterator[dict[str, Tensor]]:
    """hook_z of `layer` at every real position of the task's clean prompts, heads concatenated,
    one batch of prompts at a time, with each row's token id, prompt index and position."""
    tokens, lengths = task.tokens("clean", device=model.device)
    prompts = prompts if prompts is not None else range(len(task))
    name = z_hook(layer)
    starts = range(prompts.start, prompts.stop, batch_size)
    for start in tqdm(starts, desc=f"caching {name}", unit="batch", disable=not progress):
        rows = slice(start, min(start + batch_size, prompts.stop))
        width = int(lengths[rows].max())
        batch = tokens[rows, :width]
        _, cache = model.tl.run_with_cache(batch, stop_at_layer=layer + 1, names_filter=name)
        z = cache[name].flatten(-2)  # [batch, pos, head * d_head]
        valid = torch.arange(width, device=z.device)[None, :] < lengths[rows, None]
        prompt_ids = torch.arange(rows.start, rows.stop, device=z.device)[:, None].expand_as(valid)
        positions = torch.arange(width, device=z.device)[None, :].expand_as(valid)
        yield {"z": z[valid].float().cpu(), "token": batch[valid].int().cpu(),
               "prompt": prompt_ids[valid].int().cpu(), "position": positions[valid].int().cpu()}


def cache_key(model, task, layer: int) -> str:
    return content_key({"kind": "activations", "model": model.identity.key(), "hook": z_hook(layer),
                        "task": task.spec(), "dtype": "float32", "format": FORMAT_VERSION})


def _open(path: Path, key: str) -> ActivationCache:
    meta = json.loads((path / "meta.json").read_text())
    return ActivationCache(path, key, meta["hook"], meta["n_tokens"], meta["d_in"], meta["n_prompts"], tuple(meta["shards"]))


def find_cache(store: Store, model, task, layer: int) -> ActivationCache | None:
    key = cache_key(model, task, layer)
    path = store.activations(key)
    return _open(path, key) if path is not None else None


def cache_activations(store: Store, model, task, layer: int, shard_tokens: int = SHARD_TOKENS,
                      progress: bool = True) -> ActivationCache:
    """The stored cache of `layer`'s hook_z over the task's clean prompts, computing it if absent."""
    if not 0 <= layer < model.n_layers:
        raise WorkbenchError(f"layer {layer} is outside the model (0..{model.n_layers - 1})")
    found = find_cache(store, model, task, layer)
    if found is not None:
        return found
    key = cache_key(model, task, layer)
    with store.write_activations(key) as tmp:
        if tmp is not None:
            shards, pending, n_tokens, d_in = [], [], 0, 0

            def flush():
                name = f"shard_{len(shards):05d}.safetensors"
                save_file({k: torch.cat([p[k] for p in pending]).contiguous() for k in pending[0]}, str(tmp / name))
                shards.append(name)
                pending.clear()

            for part in collect_z(model, task, layer, progress=progress):
                pending.append(part)
                n_tokens += len(part["z"])
                d_in = part["z"].shape[1]
                if sum(len(p["z"]) for p in pending) >= shard_tokens:
                    flush()
            if pending:
                flush()
            meta = {"hook": z_hook(layer), "n_tokens": n_tokens, "d_in": d_in, "n_prompts": len(task), "shards": shards,
                    "model": model.identity.key(), "task": task.spec(), "format": FORMAT_VERSION}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return _open(store.activations(key), key)


def batches(cache: ActivationCache, batch_size: int, seed: int, prompts: range,
            skip: int = 0) -> Iterator[Float[Tensor, "batch d_in"]]:
    """Endless shuffled batches of the rows of `prompts`: shards in a random order per epoch, rows
    shuffled within each shard (tails shorter than a batch are dropped). `skip` batches are passed
    over without loading their shards, so a resumed run continues where the first one stopped."""
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        yielded = False
        for i in torch.randperm(len(cache.shards), generator=gen).tolist():
            shard = None
            rows = _shard_rows(cache, i, prompts)
            order = torch.randperm(len(rows), generator=gen)
            for b in range(0, len(order) - batch_size + 1, batch_size):
                yielded = True
                if skip:
                    skip -= 1
                    continue
                if shard is None:
                    shard = cache.shard(i)["z"]
                yield shard[rows[order[b : b + batch_size]]]
        if not yielded:
            raise WorkbenchError(f"the cache holds fewer training tokens than one batch of {batch_size}")
        epoch += 1


def _shard_rows(cache: ActivationCache, i: int, prompts: range) -> Tensor:
    """Indices of a shard's rows that belong to `prompts` (reads only the small `prompt` column)."""
    from safetensors import safe_open

    with safe_open(str(cache.path / cache.shards[i]), framework="pt") as f:
        prompt = f.get_tensor("prompt")
    return torch.nonzero((prompt >= prompts.start) & (prompt < prompts.stop))[:, 0]
