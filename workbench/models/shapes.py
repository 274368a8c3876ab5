"""Models with random weights in the shape of well-known ones, for timing and memory benchmarks.

The shapes are written out here (no hub): the embedded model's, GPT-2 small's and Llama-3.2-1B's
(without its long-context RoPE scaling, which changes no cost). A Hugging Face model is built with
random weights and converted as any Hugging Face model is (`tl_from_hf`), so the HookedTransformer
and the Hugging Face model hold the same weights and a benchmark can time both. The embedded
model's tokenizer is attached (every shape's vocabulary is at least as large), so task generators
work unchanged.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.models.tl_dir import place
from workbench.models.wrapper import Model, ModelIdentity
from workbench.spec import ModelSpec

_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "tie_word_embeddings": True, "max_position_embeddings": 8192}
SHAPES: dict[str, dict] = {
    "smollm2-135m": {**_LLAMA, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0},
    "llama-3.2-1b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0},
    "gpt2-small": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 1024, "n_ctx": 1024,
                   "n_embd": 768, "n_layer": 12, "n_head": 12},
}


def random_hf(shape: str, device: str = "cpu", seed: int = 0):
    """A Hugging Face causal LM of `shape` with random weights (float32, eval mode, SDPA attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise WorkbenchError(f"unknown model shape '{shape}'; choose one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return hf.eval()


def random_model(shape: str, dtype: str = "float32", device: str | None = None, seed: int = 0,
                 tokenizer=None, keep_hf: bool = False) -> "Model | tuple[Model, object]":
    """A Model of `shape` with random weights on `device` (default: CUDA when present) in `dtype`;
    with `keep_hf`, also the Hugging Face model holding the same weights (float32, same device).

    Its identity names the shape, seed and device instead of hashing the weights (the same seed
    draws different weights on another device): meant for benchmarks, not for the store."""
    from workbench.models.hf import hf_config_dict, tl_from_hf
    from workbench.models.registry import default_device, load_model

    device = device or default_device()
    hf = random_hf(shape, device, seed)
    if tokenizer is None:
        tokenizer = load_model("smollm2-135m").tokenizer
    tl = tl_from_hf(hf, tokenizer, hf_config_dict(hf), prepend_bos=False, device=device)
    place(tl, ModelSpec(name=shape, dtype=dtype), device)
    identity = ModelIdentity(f"random:{shape}", f"random-{shape}-seed{seed}-{torch.device(device).type}", False, dtype,
                             "random")
    model = Model(identity, tokenizer, tl=tl)
    if keep_hf:
        return model, hf
    del hf
    return model
