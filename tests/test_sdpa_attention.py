"""The fused attention forward gives TransformerLens's own results, with and without a KV cache,
keeps the hooks it does not skip firing, and steps aside for a layer whose pattern is hooked."""

import gc
import weakref

import pytest
import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from workbench.fast_forward.own_hooks import own_hooks
from workbench.fast_forward.attention import covered, reserve, sdpa_attention
from conftest import DispatchedOps, make_toy_tl

SHAPES = {
    "standard-layernorm": dict(attn_only=False, normalization_type="LN"),
    "rotary-gqa-rms": dict(attn_only=False, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8,
                           normalization_type="RMS"),
    "gated-rotary-gqa-rms": dict(attn_only=False, gated_mlp=True, act_fn="silu", n_key_value_heads=2,
                                 positional_embedding_type="rotary", rotary_dim=8, normalization_type="RMS"),
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
    tokens = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(0)).to(tl.cfg.device)
    expected, z_expected = _z(tl, tokens)
    with sdpa_attention(tl) as fused:
        assert fused and all(covered(block.attn) for block in tl.blocks)
        logits, z = _z(tl, tokens)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert z.keys() == z_expected.keys() and all(torch.allclose(z[k], z_expected[k], atol=1e-5) for k in z)
    assert all("forward" not in module.__dict__ for module in tl.modules())


def test_prefill_in_chunks_through_a_kv_cache_equals_one_forward(tl):
    tokens = torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(1)).to(tl.cfg.device)
    with torch.no_grad():
        expected = tl(tokens, stop_at_layer=tl.cfg.n_layers)
        cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 1)
        parts = []
        with sdpa_attention(tl):
            for start in (0, 7, 19, 29):  # chunks of 7, 12, 10 and a single token
                stop = {0: 7, 7: 19, 19: 29, 29: 30}[start]
                chunk = tokens[:, start:stop]
                parts.append(tl(chunk, past_kv_cache=cache, attention_mask=torch.ones_like(chunk), stop_at_layer=tl.cfg.n_layers))
    assert torch.allclose(torch.cat(parts, 1), expected, atol=1e-5)


def _cached_hooks(tl, tokens, hooks=()):
    """TransformerLens's own forward over all of `tokens`: residual at the last layer, each layer's
    keys and values, and each query's pattern argmax per head."""
    keep = lambda n: n.endswith(("attn.hook_k", "attn.hook_v", "attn.hook_pattern"))
    with torch.no_grad(), own_hooks(tl, list(hooks)):
        resid, cache = tl.run_with_cache(tokens, stop_at_layer=tl.cfg.n_layers, names_filter=keep)
    return resid, cache


@pytest.mark.parametrize("storage", ["reserved", "growing"])
def test_decoding_token_by_token_equals_one_forward_and_the_entry_holds_every_key(tl, storage):
    """A prompt in chunks, then single tokens as a decode feeds them (one query: scores, argmax and
    softmax computed directly): the residuals, each step's argmax and the entry's keys and values
    equal one TransformerLens forward over the whole sequence, whether the storage was reserved for
    the whole length (exactly that length, even where the first chunk is long enough that growing
    would overshoot it) or had to grow several times."""
    tokens = torch.randint(0, 50, (1, 60), generator=torch.Generator().manual_seed(4)).to(tl.cfg.device)
    expected, cache_full = _cached_hooks(tl, tokens)
    cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 1)
    if storage == "reserved":
        reserve(cache, 60)
    parts, steps, argmax = [], [], {}
    with torch.no_grad(), sdpa_attention(tl, argmax):
        prompt = [(0, 48), (48, 50)] if storage == "reserved" else [(0, 9), (9, 20)]
        for start, stop in prompt + [(i, i + 1) for i in range(prompt[-1][1], 60)]:
            chunk = tokens[:, start:stop]
            parts.append(tl(chunk, past_kv_cache=cache, attention_mask=torch.ones_like(chunk), stop_at_layer=tl.cfg.n_layers))
            steps.append(torch.stack([argmax[layer][0] for layer in range(tl.cfg.n_layers)]))
    assert torch.allclose(torch.cat(parts, 1), expected, atol=1e-5)
    for step, stop in enumerate([stop for _, stop in prompt] + list(range(prompt[-1][1] + 1, 61))):
        pattern_argmax = torch.stack([cache_full["pattern", layer][0, :, stop - 1].argmax(-1) for layer in range(tl.cfg.n_layers)])
        assert torch.equal(steps[step], pattern_argmax)
    for layer, entry in enumerate(cache.entries):
        assert torch.allclose(entry.past_keys, cache_full["k", layer], atol=1e-5)
        assert torch.allclose(entry.past_values, cache_full["v", layer], atol=1e-5)
    sizes = {entry._workbench_storage.capacity for entry in cache.entries}
    assert sizes == {60} if storage == "reserved" else min(sizes) > 60


def test_an_entry_replaced_from_outside_or_frozen_is_read_as_it_stands(tl):
    """Entries another caller replaced (a batch of caches stacked, rows dropped) are read afresh, not
    from stale storage; a frozen prefix shared by several continuations is never extended."""
    tokens = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(5)).to(tl.cfg.device)
    expected, _ = _cached_hooks(tl, tokens)
    with torch.no_grad(), sdpa_attention(tl):
        cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 2)
        tl(tokens[:, :20], past_kv_cache=cache, attention_mask=torch.ones_like(tokens[:, :20]), stop_at_layer=tl.cfg.n_layers)
        for entry in cache.entries:  # keep the second row only, as a batch that drops a finished row does
            entry.past_keys, entry.past_values = entry.past_keys[1:].clone(), entry.past_values[1:].clone()
        cache.previous_attention_mask = cache.previous_attention_mask[1:]
        rest = tokens[1:, 20:]
        resid = tl(rest, past_kv_cache=cache, attention_mask=torch.ones_like(rest), stop_at_layer=tl.cfg.n_layers)
        assert torch.allclose(resid, expected[1:, 20:], atol=1e-5)

        prefix = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 2)
        tl(tokens[:, :12], past_kv_cache=prefix, attention_mask=torch.ones_like(tokens[:, :12]), stop_at_layer=tl.cfg.n_layers)
        prefix.freeze()
        for stop in (13, 30, 16):
            suffix = tokens[:, 12:stop]
            resid = tl(suffix, past_kv_cache=prefix, attention_mask=torch.ones_like(suffix), stop_at_layer=tl.cfg.n_layers)
            assert torch.allclose(resid, expected[:, 12:stop], atol=1e-5)
        assert all(entry.past_keys.shape[1] == 12 for entry in prefix.entries)


def test_a_hook_on_the_rotated_keys_sees_every_key_as_in_transformer_lens(tl):
    """Through a KV cache TransformerLens rotates every cached key at each step and hook_rot_k sees
    them all; the fused forward keeps rotated keys, but with a hook there it hands the hook every key."""
    if tl.cfg.positional_embedding_type != "rotary":
        pytest.skip("no rotary keys in this shape")
    tokens = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(6)).to(tl.cfg.device)

    def halve_head_0(act, hook):
        act[:, :, 0] = act[:, :, 0] / 2
        return act

    def decode(fused: bool):
        lengths, cache = [], TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 1)
        hooks = [("blocks.1.attn.hook_rot_k", halve_head_0),
                 ("blocks.1.attn.hook_rot_k", lambda act, hook: lengths.append(act.shape[1]))]
        parts = []
        with torch.no_grad(), own_hooks(tl, hooks), sdpa_attention(tl) if fused else torch.no_grad():
            for start, stop in [(0, 12)] + [(i, i + 1) for i in range(12, 20)]:
                chunk = tokens[:, start:stop]
                parts.append(tl(chunk, past_kv_cache=cache, attention_mask=torch.ones_like(chunk), stop_at_layer=tl.cfg.n_layers))
        return torch.cat(parts, 1), lengths

    (fused, seen), (reference, seen_reference) = decode(True), decode(False)
    assert seen == seen_reference == [12] + list(range(13, 21))
    assert torch.allclose(fused, reference, atol=1e-5)
    plain, _ = _cached_hooks(tl, tokens)
    assert (plain - reference).abs().max() > 1e-3  # the hook did change the output


def test_query_hooks_still_act_and_a_hooked_pattern_keeps_transformer_lens_forward(tl):
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2)).to(tl.cfg.device)

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


@pytest.mark.parametrize("layout", [dict(rotary_dim=8), dict(rotary_dim=4), dict(rotary_dim=8, rotary_adjacent_pairs=True)])
def test_the_rotary_embedding_equals_transformer_lens_at_every_offset(layout):
    """Whole-head rotary is computed in fewer kernels; partial rotary and adjacent pairs go through
    TransformerLens's own."""
    from workbench.fast_forward.attention import _rotary

    tl = make_toy_tl(n_layers=1, seed=3, positional_embedding_type="rotary", n_ctx=16, **layout)
    attn = tl.blocks[0].attn
    x = torch.randn(2, 5, tl.cfg.n_heads, tl.cfg.d_head, generator=torch.Generator().manual_seed(0)).to(tl.cfg.device)
    for offset in (0, 7, 11):  # up to the end of the context
        expected = attn.apply_rotary(x, offset)
        assert torch.allclose(_rotary(attn, x, offset), expected, atol=1e-6)
    assert not torch.allclose(_rotary(attn, x, 3), _rotary(attn, x, 4), atol=1e-3)  # the offset matters


def test_the_rotary_table_kept_with_its_sign_follows_the_layers_table():
    """The fused rotary keeps a copy of the sine table with half its sign flipped (so no kernel
    negates half of every query and key): it is made again when the table is written to or
    replaced, as a conversion to another dtype does."""
    from workbench.fast_forward.attention import _rotary

    tl = make_toy_tl(n_layers=1, seed=3, positional_embedding_type="rotary", rotary_dim=8, n_ctx=16)
    attn = tl.blocks[0].attn
    x = torch.randn(2, 5, tl.cfg.n_heads, tl.cfg.d_head, generator=torch.Generator().manual_seed(0)).to(tl.cfg.device)
    _rotary(attn, x, 0)
    with DispatchedOps() as ops:
        assert torch.allclose(_rotary(attn, x, 3), attn.apply_rotary(x, 3), atol=1e-6)
    assert "neg" not in ops.names[: ops.names.index("addcmul") + 1]  # ours negates nothing (TransformerLens's does)
    tl.to(torch.bfloat16)  # replaced by tables of another dtype
    x = x.to(torch.bfloat16)
    close = lambda: torch.allclose(_rotary(attn, x, 3).float(), attn.apply_rotary(x, 3).float(), atol=2e-2)  # a unit in the last place
    assert _rotary(attn, x, 3).dtype == torch.bfloat16 and close()
    with torch.no_grad():
        attn.rotary_sin[:] = attn.rotary_sin * 0.5  # written to in place
    assert close()


def test_a_forward_under_inference_mode_equals_transformer_lens():
    """Tensors made under `torch.inference_mode` keep no count of in-place writes, which the
    normalise-once memo, the mask check and the kept rotary table read: they are known by identity
    then, and a forward there (one growing the rotary table too) gives TransformerLens's results."""
    tl = make_toy_tl(n_layers=2, seed=1, **SHAPES["gated-rotary-gqa-rms"], n_ctx=4096)
    short, long = (torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(n)).to(tl.cfg.device) for n in (8, 2100))
    with torch.inference_mode(), sdpa_attention(tl):
        fused = [tl(short), tl(long, attention_mask=torch.ones_like(long))]
    with torch.no_grad():
        assert all(torch.allclose(a, tl(t), atol=1e-4) for a, t in zip(fused, (short, long)))


def test_a_prompt_past_the_rotary_table_reads_the_same_before_and_after_the_table_grows():
    """TransformerLens's rotary table starts at 2,048 positions and grows on first need; the fused
    forward grows it too and keeps its own kernels, so in bfloat16 (where two ways of rotating
    round differently) a session's first long prompt gives bit for bit what the next one does."""
    from circuits.heads.retrieval import prefill
    from workbench.models import from_hooked_transformer

    tl = make_toy_tl(n_layers=2, seed=3, attn_only=False, positional_embedding_type="rotary", rotary_dim=8,
                     normalization_type="RMS", n_ctx=4096, dtype=torch.bfloat16)
    model = from_hooked_transformer(tl, "toy-bf16")
    tokens = torch.randint(0, 50, (1, 2100), generator=torch.Generator().manual_seed(2)).to(tl.cfg.device)
    assert tl.blocks[0].attn.rotary_cos.shape[0] == 2048
    reads = []
    with torch.no_grad():
        for _ in range(2):
            cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 1)
            reads.append(prefill(model, tokens, cache))
    assert tl.blocks[0].attn.rotary_cos.shape[0] == 4096
    assert torch.equal(reads[0], reads[1])


def test_each_block_normalises_its_residual_once_and_keeps_nothing_after_its_attention():
    """TransformerLens normalises a block's residual three times (queries, keys, values); inside the
    fused block it is normalised once, the result dropped once the attention has it, and a hook on
    the norm sees every call, as in TransformerLens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    tl = make_toy_tl(n_layers=3, seed=8, **SHAPES["rotary-gqa-rms"])
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(9)).to(tl.cfg.device)

    class Powers(TorchDispatchMode):  # RMS normalisation squares its input once per call (CUDA: one fused kernel)
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ in ("pow", "_fused_rms_norm")
            return func(*args, **(kwargs or {}))

    normalised = []  # weak references to every normalised residual: once a forward is over, none may be alive

    def recording(block):
        def forward(x):
            out = type(block.ln1).forward(block.ln1, x)
            normalised.append(weakref.ref(out))
            return out
        return forward

    for block in tl.blocks:
        block.ln1.forward = recording(block)
    with torch.no_grad():
        expected = tl(tokens)
        with Powers() as plain:
            tl(tokens)
        seen = []
        with sdpa_attention(tl):
            with Powers() as fused:
                logits = tl(tokens)
            with sdpa_attention(tl):  # nested, as a method run under fused attention calls one that enters it again
                assert torch.allclose(tl(tokens), expected, atol=1e-5)
            gc.collect()
            assert normalised and not any(ref() is not None for ref in normalised)
            with own_hooks(tl, [("blocks.0.ln1.hook_normalized", lambda act, hook: seen.append(act.shape))]):
                hooked = tl(tokens)
    n = tl.cfg.n_layers
    assert plain.n == 4 * n + 1 and fused.n == 2 * n + 1  # ln1 three times, ln2, ln_final
    assert torch.allclose(logits, expected, atol=1e-5) and torch.allclose(hooked, expected, atol=1e-5)
    assert len(seen) == 3


def test_entered_again_with_the_same_arguments_it_swaps_nothing_and_still_records(tl):
    """A decoding loop enters fused attention once and each step's call enters it again: the inner
    entry must leave the outer forwards in place (re-wrapping them each step cost a fifth of a step's
    host time) and they must still record the argmax."""
    tokens = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(4)).to(tl.cfg.device)
    argmax, other = {}, {}
    with torch.no_grad(), sdpa_attention(tl, argmax):
        outer = [block.attn.forward for block in tl.blocks]
        with sdpa_attention(tl, argmax) as fused:
            assert fused and [block.attn.forward for block in tl.blocks] == outer
            assert all(a is b for a, b in zip((block.attn.forward for block in tl.blocks), outer))
            tl(tokens)
        with sdpa_attention(tl, other):  # other arguments: wrapped again, recording into its own dict
            assert all(block.attn.forward is not f for block, f in zip(tl.blocks, outer))
            tl(tokens)
        assert all(block.attn.forward is f for block, f in zip(tl.blocks, outer))
    assert all("forward" not in module.__dict__ for module in tl.modules())
    _, reference = _cached_hooks(tl, tokens)
    for layer in range(tl.cfg.n_layers):
        expected = reference[f"blocks.{layer}.attn.hook_pattern"][:, :, -1].argmax(-1)
        assert torch.equal(argmax[layer], expected) and torch.equal(other[layer], expected)


def test_a_padded_mask_keeps_transformer_lens_forward_even_when_changed_in_place(tl):
    """Whether a mask pads is read once per mask tensor, not once per layer; a mask changed in place
    between two forwards is read again."""
    tokens = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(5)).to(tl.cfg.device)
    mask = torch.ones_like(tokens)
    padded = mask.clone()
    padded[1, :4] = 0
    with torch.no_grad():
        whole, left_padded = tl(tokens, attention_mask=mask), tl(tokens, attention_mask=padded)
        assert (whole[1] - left_padded[1]).abs().max() > 1e-3  # the padding matters
        with sdpa_attention(tl):
            first = tl(tokens, attention_mask=mask)
            mask[1, :4] = 0  # the same tensor, now padding
            second = tl(tokens, attention_mask=mask)
    assert torch.allclose(first, whole, atol=1e-5) and torch.allclose(second, left_padded, atol=1e-5)


def test_grouped_keys_copied_per_head_for_a_kernel_that_does_not_take_them_give_the_same_results(monkeypatch):
    """On CUDA, where no fused kernel takes grouped keys (a float32 model, a masked chunk), each key
    and value head goes to the kernel once per query head of its group, so PyTorch's math path
    never holds the scores. Forced here: a whole forward and a prompt read in masked chunks through
    a KV cache equal TransformerLens's, and the kernel saw one key and value head per query head."""
    import workbench.fast_forward.attention as sdpa

    tl = make_toy_tl(n_layers=3, seed=11, **SHAPES["gated-rotary-gqa-rms"])
    tokens = torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(1)).to(tl.cfg.device)
    real, seen = torch.nn.functional.scaled_dot_product_attention, []

    def recording(q, k, v, **kwargs):
        seen.append((q.shape[1], k.shape[1], v.shape[1], kwargs["enable_gqa"], kwargs["attn_mask"] is not None))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa, "kernel_takes_groups", lambda *args: False)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        expected = tl(tokens, stop_at_layer=tl.cfg.n_layers)
        cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 1)
        with sdpa_attention(tl):
            whole = tl(tokens, stop_at_layer=tl.cfg.n_layers)
            chunks = [tl(tokens[:, a:b], past_kv_cache=cache, attention_mask=torch.ones_like(tokens[:, a:b]),
                         stop_at_layer=tl.cfg.n_layers) for a, b in ((0, 11), (11, 30))]
    assert torch.allclose(whole, expected, atol=1e-5) and torch.allclose(torch.cat(chunks, 1), expected, atol=1e-5)
    heads = tl.cfg.n_heads
    assert seen.count((heads, heads, heads, False, False)) == 2 * tl.cfg.n_layers  # the whole forward, the first chunk
    assert seen.count((heads, heads, heads, False, True)) == tl.cfg.n_layers  # the second chunk, masked
    assert len(seen) == 3 * tl.cfg.n_layers
