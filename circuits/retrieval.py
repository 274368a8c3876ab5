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

Memory: the prompt is prefilled once into a KV cache and each decoding step reads one attention
row per head (its argmax is kept, the row dropped); no T x T pattern is ever stored. The
unembedding runs only at the last position.

ROUGE-1 recall is computed here, not with the `rouge-score` package: it is a count of shared
lower-cased alphanumeric words (the package's tokenisation, without its optional stemming),
and it must also work on token ids for models without a tokenizer.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuits.heads import head_frame, mean_z
from circuits.patching import unembed_final
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.nodes import head_name
from workbench.params import require
from workbench.result import Result
from workbench.spec import Need

Hook = tuple[str | Callable[[str], bool], Callable]


@dataclass
class Generation:
    tokens: list[int]
    argmax: Tensor | None = None  # [step, layer, head]: most-attended source position of each step's query


def _stop_ids(model) -> set[int]:
    tok = model.tokenizer
    return set(tok.all_special_ids) if tok is not None else set()


@torch.no_grad()
def greedy_generate(model, prompt: list[int], max_new_tokens: int, track_argmax: bool = False,
                    hooks: list[Hook] = (), until: Callable[[list[int]], bool] | None = None,
                    stop_at_special: bool = True) -> Generation:
    """Greedy decoding through a KV cache; optionally the argmax of every head's current attention
    row at each step. Stops at a special token (unless told not to), after `max_new_tokens`, or
    when `until(tokens)`."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    tl = model.tl
    cache = TransformerLensKeyValueCache.init_cache(tl.cfg, model.device, 1)
    current: dict[int, Tensor] = {}

    def track(pattern, hook):  # [1, head, query, key]: keep only the last query's argmax
        current[hook.layer()] = pattern[0, :, -1].argmax(-1)

    fwd = list(hooks) + ([(lambda n: n.endswith("attn.hook_pattern"), track)] if track_argmax else [])
    stops, out, rows = _stop_ids(model) if stop_at_special else set(), [], []
    x = torch.tensor([prompt], device=model.device)
    with tl.hooks(fwd_hooks=fwd):
        for _ in range(max_new_tokens):
            # an explicit mask: TransformerLens would otherwise treat pad-token ids in the prompt as padding
            resid = tl(x, past_kv_cache=cache, attention_mask=torch.ones_like(x), stop_at_layer=model.n_layers)
            token = int(unembed_final(tl, resid[:, -1:])[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
            if track_argmax:
                rows.append(torch.stack([current[layer] for layer in range(model.n_layers)]).cpu())
            if until is not None and until(out):
                break
            x = torch.tensor([[token]], device=model.device)
    return Generation(out, torch.stack(rows) if rows else torch.zeros(0, model.n_layers, model.n_heads, dtype=torch.long))


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
    meta = {"responses": scored.responses, "counted_tests": int(scored.counted.sum()), "tests": n,
            "threshold": params.threshold, "tensor_dims": {"copy_scores": ["test", "layer", "head"]}}
    return Result(pd.concat(frames, ignore_index=True), tensors={"copy_scores": scored.copy.float()}, meta=meta)


# ---------------------------------------------------------------------------------------------
# masking (the causal check)
# ---------------------------------------------------------------------------------------------


def mask_hooks(model, heads: list[tuple[int, int]], mask: str, means: dict[str, Tensor] | None = None) -> list[Hook]:
    """Hooks that knock out `heads`: zero the query (uniform attention), or zero / mean-ablate the output."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    hooks = []
    for layer, hs in by_layer.items():
        name = f"blocks.{layer}.attn.hook_{'q' if mask == 'query' else 'z'}"
        value = means[name][hs] if mask == "mean" else None

        def hook(act, hook, hs=hs, value=value):  # act: [batch, pos, head, d_head]
            act[:, :, hs] = 0 if value is None else value.to(act.dtype)
            return act

        hooks.append((name, hook))
    return hooks


def accuracy(model, tests: list[NeedleTest], params: RetrievalParams, hooks: list[Hook], desc: str) -> float:
    """Share of tests whose response reaches the ROUGE threshold (decoding stops once it does)."""
    hits = 0
    for test in tqdm(tests, desc=desc, leave=False):
        gen = greedy_generate(model, test.prompt, params.max_new_tokens, hooks=hooks,
                              until=lambda out, t=test: t.recall(model, out) > params.rouge_threshold)
        hits += test.recall(model, gen.tokens) > params.rouge_threshold
    return hits / len(tests)


@dataclass(frozen=True)
class MaskingParams(RetrievalParams):
    ks: list[int] = (1, 5, 10)
    mask: Literal["query", "zero", "mean"] = "query"
    n_random: int = 2
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.ks) and min(self.ks) >= 1, f"ks = {list(self.ks)} must be head counts of at least 1")
        require(self.n_random >= 1, f"n_random = {self.n_random} must be at least 1")


def _masking_needs(params: MaskingParams) -> dict[str, Need]:
    """The scores that pick the heads to mask: the stored `retrieval.score` run with the same scoring parameters."""
    return {"scores": Need("retrieval.score", RetrievalParams(params.max_new_tokens, params.threshold, params.rouge_threshold))}


@register("retrieval.masking", MaskingParams,
          "causal check: needle accuracy with the top-K retrieval heads masked vs K random non-retrieval heads",
          Outputs((Metric("needle_accuracy", "needle accuracy with `heads` masked (k = 0: none masked, from the scores' run)",
                          "model", ("k", "masked", "draw", "heads"), "detail"),)),
          needs=_masking_needs, version=2, task="needle")
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
    means = mean_z(model, task) if params.mask == "mean" else None
    rows = [dict(k=0, masked="none", draw=0, value=stored.value("needle_accuracy"), heads=[])]
    rng = random.Random(params.seed)
    for k in tqdm(ks, desc="masking", leave=False):
        top = order[:k]
        rows.append(dict(k=k, masked="retrieval", draw=0, heads=[head_name(*lh) for lh in top],
                         value=accuracy(model, tests, params, mask_hooks(model, top, params.mask, means), f"top {k}")))
        pool = [lh for lh in non_retrieval if lh not in top]
        if len(pool) < k:
            raise WorkbenchError(f"only {len(pool)} non-retrieval heads are left to draw {k} random heads from; use smaller ks")
        for draw in range(params.n_random):
            chosen = rng.sample(pool, k)
            rows.append(dict(k=k, masked="random", draw=draw, heads=[head_name(*lh) for lh in chosen],
                             value=accuracy(model, tests, params, mask_hooks(model, chosen, params.mask, means),
                                            f"random {k} #{draw}")))
    frame = pd.DataFrame(rows).assign(component="model", metric="needle_accuracy")
    meta = {"mask": params.mask, "tests": len(tests), "retrieval_heads": int((scores > params.threshold).sum()),
            "scores_run": stored.run_id}
    return Result(frame, meta=meta)
