"""Time loading the embedded model from the workbench cache against the reference path
(transformers dequantizing the GGUF, as every load would without the cache), in one run.
Library imports happen before either is timed.

    .venv/bin/python benchmarks/model_load.py
"""

import time

import torch

from workbench.models import load_model
from workbench.models.gguf import SMOLLM2_GGUF, smollm2_gguf


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    load_model("smollm2-135m").tl  # the cache exists (first use converts once) and imports are done
    lazy, t_identity = timed(lambda: load_model("smollm2-135m"))
    _, t_weights = timed(lambda: lazy.tl)
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    hf, t_ref = timed(lambda: AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=SMOLLM2_GGUF, dtype=torch.float32))
    ours = t_identity + t_weights
    print(f"workbench cache: identity+tokenizer {t_identity:.2f} s, weights {t_weights:.2f} s, total {ours:.2f} s")
    print(f"reference (transformers GGUF dequantize): {t_ref:.2f} s")
    print(f"speed-up: {t_ref / ours:.1f}x")


if __name__ == "__main__":
    main()
