"""The fused attention forward gives TransformerLens's own results, with and without a KV cache,
keeps the hooks it does not skip firing, and steps aside for a layer whose pattern is hooked."""

import pytest
import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from circuits.own_hooks import own_hooks
from circuits.sdpa_attention import covered, sdpa_attention
from conftest import make_toy_tl

SHAPES = {
    "standard-layernorm": dict(attn_only=False, normalization_type="LN"),
    "rotary-gqa-rms": dict(attn_only=False, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8,
                           normalization_type="RMS"),
}


@pytest.fixture(params=list(SHAPES))
def tl(request):
    return make_toy_tl(n_layers=3, seed=11, **SHAPES[request.param])


def _z(tl, tokens, hooks=()):
    seen = {}

    def keep(act, hook):
        seen[hook.name] = act.clone()

    with torch.no_grad(), own_hooks(tl, [(lambda n: n.endswith("hook_z"), keep), *hooks]):
        logits = tl(tokens)
    return logits, seen


def test_the_fused_forward_equals_transformer_lens_and_restores_it(tl):
    tokens = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(0))
    expected, z_expected = _z(tl, tokens)
    with sdpa_attention(tl) as fused:
        assert fused and all(covered(block.attn) for block in tl.blocks)
        logits, z = _z(tl, tokens)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert z.keys() == z_expected.keys() and all(torch.allclose(z[k], z_expected[k], atol=1e-5) for k in z)
    assert all("forward" not in block.attn.__dict__ for block in tl.blocks)


def test_prefill_in_chunks_through_a_kv_cache_equals_one_forward(tl):
    tokens = torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tl(tokens, stop_at_layer=tl.cfg.n_layers)
        cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tokens.device, 1)
        parts = []
        with sdpa_attention(tl):
            for start in (0, 7, 19, 29):  # chunks of 7, 12, 10 and a single token
                stop = {0: 7, 7: 19, 19: 29, 29: 30}[start]
                chunk = tokens[:, start:stop]
                parts.append(tl(chunk, past_kv_cache=cache, attention_mask=torch.ones_like(chunk), stop_at_layer=tl.cfg.n_layers))
    assert torch.allclose(torch.cat(parts, 1), expected, atol=1e-5)


def test_query_hooks_still_act_and_a_hooked_pattern_keeps_transformer_lens_forward(tl):
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))

    def zero_head_0(act, hook):  # a uniform-attention head, as retrieval masking does
        act[:, :, 0] = 0
        return act

    masked = [("blocks.1.attn.hook_q", zero_head_0)]
    expected, _ = _z(tl, tokens, masked)
    patterns = []
    with sdpa_attention(tl):
        logits, _ = _z(tl, tokens, masked)
        with own_hooks(tl, [("blocks.2.attn.hook_pattern", lambda act, hook: patterns.append(act.shape))]):
            assert not covered(tl.blocks[2].attn) and covered(tl.blocks[1].attn)
            hooked, _ = _z(tl, tokens, masked)
    assert torch.allclose(logits, expected, atol=1e-5) and torch.allclose(hooked, expected, atol=1e-5)
    assert patterns == [(2, tl.cfg.n_heads, 16, 16)]  # the hooked layer computed its pattern
    unmasked, _ = _z(tl, tokens)
    assert (unmasked - expected).abs().max() > 1e-3  # the query hook did change the output
