"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

`retrieval.score`: greedy decoding on needle-in-a-haystack prompts. At each decoding step that
generates token w, head h copies when the most-attended source position of the current query
(top-1 of that one attention row) lies inside the needle and holds w; each copy adds
1/|needle| to the head's score for the test (no de-duplication, as the reference code). A test
counts only when the model retrieved the needle: ROUGE-1 recall of the needle's answer in the
response > 0.5. A head's score is its mean over counted tests; above 0.1 it is a retrieval head.

`retrieval.masking`: the causal check. Mask the top-K heads by score, or K random heads that are
not retrieval heads, and measure needle-retrieval accuracy for several K. The default mask zeroes
the head's query, so its attention becomes uniform (as the reference code does); zero and mean
ablation of the head's output are options.

Memory: the prompt is prefilled once into a KV cache, with fused attention (no pattern is read
there), and each decoding step reads one attention row per head (its argmax is kept, the row
dropped); no T x T pattern is ever stored. The unembedding runs only at the last position.

ROUGE-1 recall is computed here, not with the `rouge-score` package: it is a count of shared
lower-cased alphanumeric words (the package's tokenisation, without its optional stemming),
and it must also work on token ids for models without a tokenizer.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
from torch import Tensor
from workbench.progress import tqdm

from circuits.heads.scores import head_frame, mean_z
from workbench.fast_forward.own_hooks import Hook, own_hooks
from circuits.patching.engine import unembed_final
from workbench.fast_forward.attention import covered, reserve, sdpa_attention
from workbench.device_memory import forward_bytes_per_token, memory_budget
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.nodes import head_name
from workbench.params import require, to_dict
from workbench.result import Result
from workbench.spec import Need

@dataclass
class Generation:
    tokens: list[int]
    argmax: Tensor | None = None  # [step, layer, head]: most-attended source position of each step's query


def _stop_ids(model) -> set[int]:
    tok = model.tokenizer
    return set(tok.all_special_ids) if tok is not None else set()


PREFILL_BYTES = 256 * 2**20  # one layer's activations (and attention scores, unfused) while a long prompt is read


def prefill(model, x: Tensor, cache, argmax: dict[int, Tensor] | None = None) -> Tensor:
    """Run new tokens `x` [batch, new] through `cache` and return the residual at the last layer.
    Attention runs fused where no hook reads a pattern (`workbench.fast_forward.attention`, which records
    each layer's last-query argmax into `argmax` when given), else through TransformerLens's own
    scores; either way a long prompt goes in chunks of queries, so a layer's activations (or its
    [head, query, key] scores) stay within PREFILL_BYTES rather than growing with the square of
    its length. The hooks these runs carry act on one position at a time, so chunking changes no
    result."""
    cfg, n_new = model.tl.cfg, x.shape[1]
    n_keys = n_new + cache.entries[0].past_keys.shape[1]
    with sdpa_attention(model.tl, argmax) as fused:
        width = torch.finfo(cfg.dtype).bits // 8
        # fused: a layer's activations, and the chunk's causal mask against every key (boolean, and
        # as scores' dtype inside the kernel); else every head's scores
        per_query = (x.shape[0] * forward_bytes_per_token(cfg, 0) + n_keys * (1 + width) if fused
                     else x.shape[0] * cfg.n_heads * n_keys * width)
        # on CUDA a masked chunk's grouped keys and values may go to the kernel one copy per head
        # (`sdpa_attention.kernel_takes_groups`): a fixed cost of the chunk, whatever its length
        grouped = fused and x.device.type == "cuda" and (cfg.n_key_value_heads or cfg.n_heads) < cfg.n_heads
        expanded = 2 * x.shape[0] * cfg.n_heads * n_keys * cfg.d_head * width if grouped else 0
        step = max(16, (PREFILL_BYTES - expanded) // per_query)
        for start in range(0, n_new, step):
            # an explicit mask: TransformerLens would otherwise treat pad-token ids in the prompt as padding
            chunk = x[:, start : start + step]
            resid = model.tl(chunk, past_kv_cache=cache, attention_mask=torch.ones_like(chunk), stop_at_layer=model.n_layers)
    return resid


@torch.no_grad()
def greedy_generate(model, prompt: list[int], max_new_tokens: int, track_argmax: bool = False,
                    hooks: list[Hook] = (), stop_at_special: bool = True) -> Generation:
    """Greedy decoding through a KV cache; optionally the argmax of every head's current attention
    row at each step. Stops at a special token (unless told not to) or after `max_new_tokens`.
    Attention runs fused, the argmax read from each step's scores; where a layer cannot (its
    configuration, or a pattern hook among `hooks`), every layer runs TransformerLens's own
    attention and a hook reads the argmax off the pattern."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    tl = model.tl
    cache = TransformerLensKeyValueCache.init_cache(tl.cfg, model.device, 1)
    reserve(cache, len(prompt) + max_new_tokens)
    current: dict[int, Tensor] = {}

    def track(pattern, hook):  # [1, head, query, key]: keep only the last query's argmax
        current[hook.layer()] = pattern[0:1, :, -1].argmax(-1)

    stops, out, rows = _stop_ids(model) if stop_at_special else set(), [], []
    x = torch.tensor([prompt], device=model.device)
    argmax = current if track_argmax else None
    with own_hooks(tl, list(hooks)):
        fused = all(covered(block.attn) for block in tl.blocks)
        tracking = [(lambda n: n.endswith("attn.hook_pattern"), track)] if track_argmax and not fused else []
        with own_hooks(tl, tracking), sdpa_attention(tl, argmax):  # entered once: each step's prefill swaps nothing
            for _ in range(max_new_tokens):
                resid = prefill(model, x, cache, argmax)
                token = int(unembed_final(tl, resid[:, -1:])[0, -1].argmax())
                if token in stops:
                    break
                out.append(token)
                if track_argmax:  # kept on the device until the end: a copy per step would wait for it
                    rows.append(torch.stack([current[layer][0] for layer in range(model.n_layers)]))
                x = torch.tensor([[token]], device=model.device)
    return Generation(out, torch.stack(rows).cpu() if rows else torch.zeros(0, model.n_layers, model.n_heads, dtype=torch.long))


def copy_scores(sequence: list[int], gen: Generation, start: int, end: int) -> Tensor:
    """[layer, head] copy-paste score of one test: copies from the needle span [start, end) / its length."""
    if not gen.tokens:
        return torch.zeros(gen.argmax.shape[1:])
    src = torch.tensor(sequence + gen.tokens)
    generated = torch.tensor(gen.tokens)[:, None, None]
    pos = gen.argmax
    hits = (pos >= start) & (pos < end) & (src[pos] == generated)
    return hits.sum(0).double() / (end - start)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(reference: list, response: list) -> float:
    """Share of the reference's unigrams (with multiplicity) found in the response."""
    if not reference:
        return 0.0
    ref, resp = Counter(reference), Counter(response)
    return sum(min(c, resp[w]) for w, c in ref.items()) / sum(ref.values())


@dataclass
class NeedleTest:
    prompt: list[int]
    start: int
    end: int
    reference: list  # words of the needle's answer (token ids without a tokenizer)

    def recall(self, model, generated: list[int]) -> float:
        response = words(model.decode(generated)) if model.tokenizer is not None else generated
        return rouge1_recall(self.reference, response)


def needle_tests(model, task, max_new_tokens: int) -> list[NeedleTest]:
    """The task's prompts as needle tests; refuses a task without needle spans."""
    if not task.rows or any("needle_start" not in r or "needle_end" not in r for r in task.rows):
        raise WorkbenchError(
            f"retrieval scoring needs a needle task (rows with needle_start/needle_end); task '{task.name}' has none. "
            "Use task = \"needle\" or a JSONL task whose rows give those fields"
        )
    tests = []
    for i, (prompt, row) in enumerate(zip(task.clean, task.rows)):
        start, end = int(row["needle_start"]), int(row["needle_end"])
        if not 0 <= start < end <= len(prompt):
            raise WorkbenchError(f"task row {i}: needle span [{start}, {end}) is not inside the {len(prompt)}-token prompt")
        if len(prompt) + max_new_tokens > model.n_ctx:
            raise WorkbenchError(
                f"task row {i}: prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {model.n_ctx}; use shorter context_lengths or fewer new tokens"
            )
        if model.tokenizer is not None:
            answer = row.get("answer_text") or model.decode(prompt[start:end])
            reference = words(answer)
        else:
            reference = list(prompt[start:end])
        tests.append(NeedleTest(prompt, start, end, reference))
    return tests


@dataclass(frozen=True)
class RetrievalParams:
    max_new_tokens: int = 32
    threshold: float = 0.1
    rouge_threshold: float = 0.5

    def __post_init__(self):
        require(self.max_new_tokens >= 1, f"max_new_tokens = {self.max_new_tokens} must be at least 1")
        require(0 <= self.threshold < 1 and 0 <= self.rouge_threshold < 1,
                "threshold and rouge_threshold are shares: give values in [0, 1)")


@dataclass
class ScoredTests:
    copy: Tensor  # [test, layer, head]
    recall: list[float]
    responses: list[str]
    counted: Tensor = field(init=False)  # [test] bool
    threshold: float = 0.5

    def __post_init__(self):
        self.counted = torch.tensor(self.recall) > self.threshold

    def head_scores(self) -> Tensor:
        return self.copy[self.counted].mean(0)


def score_tests(model, tests: list[NeedleTest], params: RetrievalParams) -> ScoredTests:
    copies, recalls, responses = [], [], []
    for test in tqdm(tests, desc="retrieval scoring", leave=False):
        gen = greedy_generate(model, test.prompt, params.max_new_tokens, track_argmax=True)
        copies.append(copy_scores(test.prompt, gen, test.start, test.end))
        recalls.append(test.recall(model, gen.tokens))
        responses.append(model.decode(gen.tokens) if model.tokenizer is not None else " ".join(map(str, gen.tokens)))
    scored = ScoredTests(torch.stack(copies), recalls, responses, threshold=params.rouge_threshold)
    if not scored.counted.any():
        shown = "; ".join(repr(r[:60]) for r in responses[:3])
        raise WorkbenchError(
            f"the model retrieved the needle in none of the {len(tests)} tests (ROUGE-1 recall of the answer <= "
            f"{params.rouge_threshold}), so every retrieval score would be a silent zero. Use shorter context_lengths, "
            f"other needles or more max_new_tokens. First responses: {shown}"
        )
    return scored


def few_counted_warning(counted: int, n: int) -> list[str]:
    """A warning (also raised as a Python warning, for notebooks) when fewer than half the tests count."""
    if 2 * counted >= n:
        return []
    text = (f"the model answered only {counted} of {n} needle tests, so the scores rest on those few; an instruct model "
            "answers when prompted in its chat format (task_params prompt_format = \"auto\")")
    warnings.warn(text, stacklevel=2)
    return [text]


RETRIEVAL_OUTPUTS = Outputs((
    Metric("retrieval_score", "copy-paste score: share of the needle the head copies while the model answers, mean over "
           "answered tests"),
    Metric("needle_rouge1_recall", "ROUGE-1 recall of the needle's answer in the response, per test", "model", ("prompt",), "detail"),
    Metric("needle_accuracy", "share of tests answered (recall above rouge_threshold)", "model", (), "summary"),
    Metric("retrieval_head_share", "share of heads scoring above threshold", "model", (), "summary"),
    Metric("retrieval_zero_share", "share of heads scoring exactly 0", "model", (), "summary"),
), tensors={"copy_scores": ("test", "layer", "head")})


@register("retrieval.score", RetrievalParams,
          "retrieval-head score per head (Wu et al. 2024): copy-paste from the needle during greedy decoding",
          RETRIEVAL_OUTPUTS, task="needle")
def retrieval_score(model, task, params: RetrievalParams, ctx) -> Result:
    scored = score_tests(model, needle_tests(model, task, params.max_new_tokens), params)
    scores = scored.head_scores()
    n = len(scored.recall)
    frames = [
        head_frame(model, scores, "retrieval_score"),
        pd.DataFrame({"component": "model", "metric": "needle_rouge1_recall", "value": scored.recall, "prompt": range(n)}),
        pd.DataFrame({"component": "model",
                      "metric": ["needle_accuracy", "retrieval_head_share", "retrieval_zero_share"],
                      "value": [scored.counted.float().mean().item(), (scores > params.threshold).float().mean().item(),
                                (scores == 0).float().mean().item()]}),
    ]
    counted = int(scored.counted.sum())
    meta = {"responses": scored.responses, "counted_tests": counted, "tests": n, "threshold": params.threshold,
            "warnings": few_counted_warning(counted, n), "tensor_dims": {"copy_scores": ["test", "layer", "head"]}}
    return Result(pd.concat(frames, ignore_index=True), tensors={"copy_scores": scored.copy.float()}, meta=meta)


# ---------------------------------------------------------------------------------------------
# masking (the causal check)
# ---------------------------------------------------------------------------------------------


def head_mask(model, head_sets: list[list[tuple[int, int]]]) -> Tensor:
    """[row, layer, head] bool: the heads each row knocks out."""
    drop = torch.zeros(len(head_sets), model.n_layers, model.n_heads, dtype=torch.bool)
    for row, heads in enumerate(head_sets):
        for layer, head in heads:
            drop[row, layer, head] = True
    return drop


def mask_hooks(model, drop: Tensor, mask: str, means: dict[str, Tensor] | None = None) -> list[Hook]:
    """Hooks that knock out, in batch row r, the heads `drop[r]` marks: zero the query (uniform
    attention), or zero / mean-ablate the output."""
    hooks = []
    for layer in drop.any(0).any(-1).nonzero().flatten().tolist():
        name = f"blocks.{layer}.attn.hook_{'q' if mask == 'query' else 'z'}"
        gone = drop[:, layer].to(model.device)[:, None, :, None]  # [row, 1, head, 1]
        fill = means[name].to(model.device) if mask == "mean" else None  # [head, d_head]

        def hook(act, hook, gone=gone, fill=fill):  # act: [batch, pos, head, d_head]
            return torch.where(gone, torch.zeros((), dtype=act.dtype) if fill is None else fill.to(act.dtype), act)

        hooks.append((name, hook))
    return hooks


def _stack_caches(caches: list, rows: list[int] | None = None):
    """The first cache, made to hold the batch of every cache in `caches` (or only its own `rows`)."""
    out = caches[0]
    for layer, entry in enumerate(out.entries):
        if rows is None:
            entry.past_keys = torch.cat([c.entries[layer].past_keys for c in caches])
            entry.past_values = torch.cat([c.entries[layer].past_values for c in caches])
        else:
            entry.past_keys, entry.past_values = entry.past_keys[rows], entry.past_values[rows]
    out.previous_attention_mask = (torch.cat([c.previous_attention_mask for c in caches]) if rows is None
                                   else out.previous_attention_mask[rows])
    return out


@torch.no_grad()
def decode_masked(model, test: NeedleTest, drop: Tensor, mask: str, means, params: RetrievalParams) -> list[list[int]]:
    """Greedy answers to one test, one per row of `drop` (the heads that row knocks out). Each row is
    prefilled alone (on a CPU a batch of long prompts is slower than one at a time), then the rows
    decode together, leaving the batch when they answer, emit a special token or reach max_new_tokens."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    tl, stops = model.tl, _stop_ids(model)
    x = torch.tensor([test.prompt], device=model.device)
    caches, nxt = [], []
    for row in range(len(drop)):
        cache = TransformerLensKeyValueCache.init_cache(tl.cfg, model.device, 1)
        reserve(cache, len(test.prompt))  # stacked below into a new cache
        with own_hooks(tl, mask_hooks(model, drop[row : row + 1], mask, means)):
            resid = prefill(model, x, cache)
        caches.append(cache)
        nxt.append(int(unembed_final(tl, resid[:, -1:])[0, -1].argmax()))
    cache, active, outs = _stack_caches(caches), list(range(len(drop))), [[] for _ in range(len(drop))]
    reserve(cache, len(test.prompt) + params.max_new_tokens)
    with sdpa_attention(tl):  # entered once for the decode, not per step
        while True:
            keep = []
            for j, (row, token) in enumerate(zip(active, nxt)):
                if token in stops:
                    continue
                outs[row].append(token)
                if len(outs[row]) < params.max_new_tokens and test.recall(model, outs[row]) <= params.rouge_threshold:
                    keep.append(j)
            if not keep:
                return outs
            if len(keep) < len(active):
                cache = _stack_caches([cache], keep)
                active = [active[j] for j in keep]
            x = torch.tensor([[outs[row][-1]] for row in active], device=model.device)
            with own_hooks(tl, mask_hooks(model, drop[active], mask, means)):
                resid = tl(x, past_kv_cache=cache, attention_mask=torch.ones_like(x), stop_at_layer=model.n_layers)
            nxt = unembed_final(tl, resid[:, -1:])[:, -1].argmax(-1).tolist()


def outcomes(model, tests: list[NeedleTest], params: RetrievalParams, drop: Tensor, mask: str = "query",
             means: dict[str, Tensor] | None = None, desc: str = "masking") -> tuple[list[list[bool]], list[list[str]]]:
    """Per row of `drop` and per test: whether the response reaches the ROUGE threshold (decoding
    stops once it does), and the response."""
    hits, responses = [[] for _ in drop], [[] for _ in drop]
    for test in tqdm(tests, desc=desc, leave=False):
        rows = _rows_per_batch(model, len(test.prompt) + params.max_new_tokens)
        for first in range(0, len(drop), rows):
            answers = decode_masked(model, test, drop[first : first + rows], mask, means, params)
            for row, tokens in enumerate(answers, start=first):
                hits[row].append(test.recall(model, tokens) > params.rouge_threshold)
                responses[row].append(model.decode(tokens) if model.tokenizer is not None else " ".join(map(str, tokens)))
    return hits, responses


def _rows_per_batch(model, length: int) -> int:
    """How many rows decode together: their KV caches (keys and values, every layer) within the
    memory budget (2 GiB on the CPU, half the free memory on a GPU)."""
    budget_bytes = memory_budget(model.device, 2 << 30)
    cfg = model.tl.cfg
    per_row = 2 * cfg.n_layers * (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head * length * torch.finfo(cfg.dtype).bits // 8
    return max(1, budget_bytes // per_row)


def bootstrap_interval(hits: Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over tests of the mean of `hits` [..., test] (draws averaged per test first)."""
    per_test = hits.double().reshape(-1, hits.shape[-1]).mean(0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(per_test), (n_boot, len(per_test)), generator=g)
    means = per_test[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype)).tolist()
    return lo, hi


@dataclass(frozen=True)
class MaskingParams(RetrievalParams):
    ks: list[int] = (1, 5, 10)
    mask: Literal["query", "zero", "mean"] = "query"
    n_random: int = 2
    seed: int = 0
    min_baseline: float = 0.5
    scores: Need | None = None  # the retrieval.score run that picks the heads; default: on these same tests

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.ks) and min(self.ks) >= 1, f"ks = {list(self.ks)} must be head counts of at least 1")
        require(self.n_random >= 1, f"n_random = {self.n_random} must be at least 1")
        require(0 <= self.min_baseline <= 1, f"min_baseline = {self.min_baseline} is an accuracy: give a value in [0, 1]")
        require(self.scores is None or self.scores.method == "retrieval.score",
                f"scores must name a retrieval.score run, not '{getattr(self.scores, 'method', None)}'")


def _masking_needs(params: MaskingParams) -> dict[str, Need]:
    """The scores that pick the heads to mask: the named `retrieval.score` run (on other needles, for a
    selection that does not see the test set), or by default one on this task with the same scoring parameters."""
    if params.scores is not None:
        return {"scores": params.scores}
    return {"scores": Need("retrieval.score", RetrievalParams(params.max_new_tokens, params.threshold, params.rouge_threshold))}


def _needle_set(task_params) -> set[int]:
    from workbench.tasks.needle import NEEDLES

    chosen = (task_params if isinstance(task_params, dict) else to_dict(task_params) if task_params else {}).get("needles")
    return set(range(len(NEEDLES))) if chosen is None else set(chosen)


def selection(params: MaskingParams, task) -> str:
    """How the masked heads were chosen relative to the masked tests."""
    if params.scores is None or params.scores.task is None:
        return "same tests"
    other = params.scores.task
    if other.name != "needle" or task.name != "needle":
        return "another task"
    return "held-out needles" if not _needle_set(other.params) & _needle_set(task.params) else "overlapping needles"


MASKING_INDEX = ("k", "masked", "draw", "heads")
MASKING_OUTPUTS = Outputs((
    Metric("needle_accuracy", "needle accuracy with `heads` masked (k = 0: none masked)", "model", MASKING_INDEX, "detail"),
    Metric("masking_curve", "needle accuracy per (k, masked), mean over random draws", "model", ("k", "masked"), "summary"),
    Metric("masking_curve_low", "lower end of the 95% bootstrap interval over tests of masking_curve", "model",
           ("k", "masked"), "detail"),
    Metric("masking_curve_high", "upper end of the 95% bootstrap interval over tests of masking_curve", "model",
           ("k", "masked"), "detail"),
), tensors={"hits": ("condition", "test")})


@register("retrieval.masking", MaskingParams,
          "causal check: needle accuracy with the top-K retrieval heads masked vs K random non-retrieval heads",
          MASKING_OUTPUTS, needs=_masking_needs, version=3, task="needle")
def retrieval_masking(model, task, params: MaskingParams, ctx) -> Result:
    ks = sorted(set(params.ks))
    n_total = model.n_layers * model.n_heads
    if ks[-1] >= n_total:
        raise WorkbenchError(f"ks must be head counts between 1 and {n_total - 1}")
    stored = ctx.inputs["scores"]
    scores = torch.zeros(model.n_layers, model.n_heads)
    for r in stored.metric("retrieval_score").itertuples():
        scores[int(r.layer), int(r.head)] = r.value
    tests = needle_tests(model, task, params.max_new_tokens)
    order = sorted(((layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)),
                   key=lambda lh: -float(scores[lh]))
    non_retrieval = [lh for lh in order if float(scores[lh]) <= params.threshold]
    for k in ks:
        if len([lh for lh in non_retrieval if lh not in order[:k]]) < k:
            raise WorkbenchError(f"only {len(non_retrieval)} non-retrieval heads to draw {k} random heads from; use smaller ks")
    none = head_mask(model, [[]])
    (base_hits,), (base_responses,) = outcomes(model, tests, params, none, desc="unmasked")
    baseline = sum(base_hits) / len(tests)
    if baseline < params.min_baseline:
        raise WorkbenchError(
            f"the unmasked model answers {sum(base_hits)} of {len(tests)} needle tests (accuracy {baseline:.2f}), below "
            f"min_baseline = {params.min_baseline}: a drop from a broken baseline shows nothing. Use the chat format "
            f"(task_params prompt_format = \"auto\") for an instruct model, shorter context_lengths, or a lower min_baseline"
        )
    means = mean_z(model, task) if params.mask == "mean" else None
    conditions = [dict(k=0, masked="none", draw=0, heads=[])]
    rng = random.Random(params.seed)
    for k in ks:
        top = order[:k]
        conditions.append(dict(k=k, masked="retrieval", draw=0, heads=top))
        pool = [lh for lh in non_retrieval if lh not in top]
        conditions += [dict(k=k, masked="random", draw=d, heads=rng.sample(pool, k)) for d in range(params.n_random)]
    masked_hits, masked_responses = outcomes(model, tests, params, head_mask(model, [c["heads"] for c in conditions[1:]]),
                                             params.mask, means, f"masking ({len(conditions) - 1} head sets per test)")
    hits = [base_hits] + masked_hits
    labels = [f"{c['masked']} {c['k']}" + (f" #{c['draw']}" if c["masked"] == "random" else "") for c in conditions[1:]]
    responses = {"none": base_responses, **dict(zip(labels, masked_responses))}
    hits_t = torch.tensor(hits, dtype=torch.bool)  # [condition, test]
    rows = [dict(metric="needle_accuracy", value=hits_t[i].double().mean().item(), k=c["k"], masked=c["masked"],
                 draw=c["draw"], heads=[head_name(*lh) for lh in c["heads"]]) for i, c in enumerate(conditions)]
    for (k, masked) in dict.fromkeys((c["k"], c["masked"]) for c in conditions):
        group = hits_t[[i for i, c in enumerate(conditions) if (c["k"], c["masked"]) == (k, masked)]]
        lo, hi = bootstrap_interval(group, seed=params.seed)
        rows += [dict(metric=m, value=v, k=k, masked=masked, draw=None, heads=None) for m, v in
                 (("masking_curve", group.double().mean().item()), ("masking_curve_low", lo), ("masking_curve_high", hi))]
    frame = pd.DataFrame(rows).assign(component="model")
    meta = {"mask": params.mask, "tests": len(tests), "answered_unmasked": int(sum(base_hits)), "baseline_accuracy": baseline,
            "retrieval_heads": int((scores > params.threshold).sum()), "scores_run": stored.run_id,
            "selection": selection(params, task), "responses": responses,
            "warnings": few_counted_warning(int(sum(base_hits)), len(tests)),
            "tensor_dims": {"hits": ["condition", "test"]}}
    return Result(frame, tensors={"hits": hits_t.to(torch.uint8)}, meta=meta)
