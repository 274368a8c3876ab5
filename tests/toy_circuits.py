"""A hand-wired two-layer attention-only model whose heads are known by construction.

Residual stream = [current token one-hot | position one-hot | previous token one-hot].
- L0H0 is a previous-token head: the query at position i matches the key at i - 1 (positions),
  and it writes the attended token into the "previous token" block.
- L1H0 is an induction head: the query (current token) matches keys whose "previous token" block
  holds the same token, and it writes the attended token, doubled, into the token block, so the
  unembedding predicts it. It copies: on a repeated sequence it predicts the repeat, and after the
  token just before a needle it reproduces the needle token by token.
- L0H1 and L1H1 have zero weights: uniform attention, no output; with `decoy=True` L1H1 is a
  decoy: uniform attention, values from the token block, written 50x into the position block,
  which nothing after layer 0 reads: large activations that never reach the logits.
"""

from __future__ import annotations

import torch

VOCAB = 48
N_CTX = 48
SHARP = 20.0  # attention logit of a match (after the 1/sqrt(d_head) scale)


def make_induction_toy(decoy: bool = False):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.models import default_device

    tok, pos, prev = 0, VOCAB, VOCAB + N_CTX
    d_model, d_head = 2 * VOCAB + N_CTX, max(VOCAB, N_CTX)
    cfg = HookedTransformerConfig(n_layers=2, n_heads=2, d_head=d_head, d_model=d_model, d_vocab=VOCAB, n_ctx=N_CTX,
                                  attn_only=True, act_fn=None, normalization_type=None, init_weights=False,
                                  device=default_device())
    tl = HookedTransformer(cfg)
    with torch.no_grad():
        for p in tl.parameters():
            p.zero_()
        c = SHARP * d_head**0.5
        eye_v = torch.eye(VOCAB)
        tl.embed.W_E[:, tok : tok + VOCAB] = eye_v
        tl.pos_embed.W_pos[:, pos : pos + N_CTX] = torch.eye(N_CTX)
        a0, a1 = tl.blocks[0].attn, tl.blocks[1].attn
        for p in range(N_CTX):  # previous-token head: query i . key j = c [i == j + 1]
            a0.W_Q[0, pos + p, p] = c
            if p + 1 < d_head:
                a0.W_K[0, pos + p, p + 1] = 1.0
        a0.W_V[0, tok : tok + VOCAB, :VOCAB] = eye_v
        a0.W_O[0, :VOCAB, prev : prev + VOCAB] = eye_v
        a1.W_Q[0, tok : tok + VOCAB, :VOCAB] = c * eye_v  # induction head: current token vs previous token
        a1.W_K[0, prev : prev + VOCAB, :VOCAB] = eye_v
        a1.W_V[0, tok : tok + VOCAB, :VOCAB] = eye_v
        a1.W_O[0, :VOCAB, tok : tok + VOCAB] = 2 * eye_v
        tl.unembed.W_U[tok : tok + VOCAB, :] = 10 * eye_v  # sharp predictions
        if decoy:
            a1.W_V[1, tok : tok + VOCAB, :VOCAB] = eye_v
            a1.W_O[1, :VOCAB, pos : pos + VOCAB] = 50 * eye_v
    tl.eval()
    return tl


def needle_prompt(seed: int = 0, hay_before: int = 10, needle_len: int = 6, hay_after: int = 8):
    """[filler] hay... needle... hay... [the token just before the needle]: all tokens distinct but the cue.

    Returns (prompt, needle_start, needle_end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(VOCAB, generator=g)[: 1 + hay_before + needle_len + hay_after].tolist()
    start = 1 + hay_before
    end = start + needle_len
    return ids + [ids[start - 1]], start, end


def needle_task(seeds=(0, 1, 2)):
    """A needle task of `needle_prompt`s: the wired induction head answers every one."""
    from workbench.tasks.base import Task

    clean, rows = [], []
    for s in seeds:
        prompt, start, end = needle_prompt(seed=s)
        clean.append(prompt)
        rows.append(dict(needle_start=start, needle_end=end))
    return Task("toy-needle", {}, clean, [list(c) for c in clean], [c[-1] for c in clean], [0] * len(clean), rows)
