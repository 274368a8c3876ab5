"""The TransformerLens directory format (toy models and our own model cache): `config.json` with
HookedTransformerConfig fields + `model.safetensors`, plus how a loaded model is placed on its
device and dtype and laid out so TransformerLens's per-forward weight copies are no-ops."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from workbench.atomic import atomic_dir
from workbench.errors import WorkbenchError
from workbench.fast_forward.joint_weights import join_projections
from workbench.models.wrapper import SHAPE_KEYS, Model, ModelIdentity
from workbench.spec import ModelSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
WORKBENCH_META = "workbench.json"


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
    with atomic_dir(path, path.parent / f".{path.name}.staging", replace=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(_cfg_to_json(tl.cfg), indent=1))
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tl.named_parameters()}, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        st = (tmp / "model.safetensors").stat()
        meta = {**(meta or {}), "weights_hash": weights_hash(tl), "file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns}
        (tmp / WORKBENCH_META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(path.parent / f".{path.name}.staging", ignore_errors=True)
    return path


def is_tl_dir(path: Path) -> bool:
    cfg_file = path / "config.json"
    if not (cfg_file.is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{cfg_file} is not valid JSON ({e}); fix or regenerate the file") from e
    return "d_model" in cfg and "n_layers" in cfg and "architectures" not in cfg


def hooked_transformer(cfg, tokenizer=None, device: str = "cpu"):
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        with torch.device(device):  # parameters are created where they will live
            return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


def load_tl_dir(path: Path, spec: ModelSpec, device: str) -> Model:
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
                     loader=lambda: place(_read_tl_dir(path, raw, tokenizer, prepend_bos), spec, device))
    tl = _read_tl_dir(path, raw, tokenizer, prepend_bos)
    identity = ModelIdentity(name, weights_hash(tl), prepend_bos, spec.dtype, source)
    return Model(identity, tokenizer, tl=place(tl, spec, device))


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
    tl = hooked_transformer(cfg, tokenizer)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = tl.load_state_dict(state, strict=False, assign=True)
    params = {k for k, _ in tl.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise WorkbenchError(
            f"{path}/model.safetensors does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return tl


def place(tl, spec: ModelSpec, device: str):
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
    Each layer's query, key and value weights (and a gated MLP's gate and input weights) then
    share one matrix (`workbench.fast_forward.joint_weights`), which fused forwards multiply by once.
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
    join_projections(tl)
