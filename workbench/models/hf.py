"""Hugging Face models: local directories and hub names TransformerLens supports, converted into a
processed HookedTransformer (layer-norm folding, centred unembedding, folded value biases)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.models.tl_dir import place, weights_hash, hooked_transformer
from workbench.models.wrapper import Model, ModelIdentity
from workbench.spec import ModelSpec


def tl_from_hf(hf_model, tokenizer, hf_config: dict[str, Any], prepend_bos: bool, device: str = "cpu"):
    """Convert a loaded HF causal LM into a processed HookedTransformer, as TL's from_pretrained does
    (built on `device`: a large model converts much faster on the GPU its weights are on).

    TransformerLens reads the config from a directory, and for paths whose name contains
    "llama" or "gemma" it guesses from the name instead of reading it; so the config is handed
    over in a temporary directory with a neutral name.
    """
    import tempfile

    import transformer_lens.loading_from_pretrained as lp

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neutral = Path(tmp) / "model"
        neutral.mkdir()
        (neutral / "config.json").write_text(json.dumps(hf_config))
        cfg = lp.get_pretrained_model_config(str(neutral), fold_ln=True, default_prepend_bos=prepend_bos, device=device)
        state = lp.get_pretrained_state_dict(str(neutral), cfg, hf_model)
    cfg.tokenizer_name = None  # the tokenizer (if any) is passed in; never look for one elsewhere
    tl = hooked_transformer(cfg, tokenizer, device)
    is_layernorm = cfg.normalization_type in ("LN", "LNPre")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=is_layernorm, center_unembed=True, fold_value_biases=True)
    return tl


def hf_config_dict(hf_model) -> dict[str, Any]:
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)  # GGUF-loaded models carry one; TransformerLens must not see it
    config.setdefault("architectures", [type(hf_model).__name__])
    config["architectures"] = config["architectures"] or [type(hf_model).__name__]
    return config


def _tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def check_same_logprobs(hf_model, tl, tokenizer, prompts=("The capital of France is", "When Mary and John went to the store,")):
    """Refuse a conversion whose log-probs differ from the HF model's (folding must not change them)."""
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            a = hf_model(ids).logits.float().log_softmax(-1)
            b = tl(ids).float().log_softmax(-1)
        err = (a - b).abs().max().item()
        if err > 1e-3:
            raise RuntimeError(f"converted model disagrees with the Hugging Face model on {p!r} (max |dlogprob| {err:.2e})")


def load_hf_dir(path: Path, spec: ModelSpec, device: str) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"could not load a Hugging Face causal LM from {path}: {e}") from e
    if spec.prepend_bos is not None:
        prepend_bos = spec.prepend_bos
    else:
        prepend_bos = tokenizer is not None and _tokenizer_adds_bos(tokenizer)
    try:
        tl = tl_from_hf(hf, tokenizer, hf_config_dict(hf), prepend_bos)
    except (ValueError, NotImplementedError, KeyError) as e:
        raise WorkbenchError(f"TransformerLens does not support the model in {path}: {e}") from e
    identity = ModelIdentity(str(path.resolve()), weights_hash(tl), prepend_bos, spec.dtype, "hf-dir")
    return Model(identity, tokenizer, tl=place(tl, spec, device))


def official_name(name: str) -> str:
    from workbench.models.registry import REGISTRY

    def registry_names():
        return list(REGISTRY)

    import transformer_lens.loading_from_pretrained as lp

    try:
        return lp.get_official_model_name(name)
    except ValueError:
        raise WorkbenchError(
            f"unknown model '{name}': use a registry name ({', '.join(registry_names())}), a local model directory, "
            "or a Hugging Face name TransformerLens supports (`workbench models --all` lists them)"
        ) from None


def load_hub(spec: ModelSpec, device: str) -> Model:
    official = official_name(spec.name)
    from transformer_lens import HookedTransformer

    kwargs = {} if spec.prepend_bos is None else {"default_prepend_bos": spec.prepend_bos}
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one error line, not a log line per retry
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tl = HookedTransformer.from_pretrained(official, device="cpu", **kwargs)
    except Exception as e:  # offline, gated, or missing files: hub clients raise many types
        raise WorkbenchError(
            f"could not fetch '{official}' from the Hugging Face hub ({type(e).__name__}); "
            "check the network, or download it elsewhere and pass its local directory"
        ) from e
    prepend_bos = bool(tl.cfg.default_prepend_bos)
    identity = ModelIdentity(official, weights_hash(tl), prepend_bos, spec.dtype, "hf-hub")
    return Model(identity, tl.tokenizer, tl=place(tl, spec, device))
