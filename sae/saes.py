"""SAEs in the store, in SAELens's own format: a stored SAE run holds the SAELens state dict as
its tensors (W_enc, W_dec, b_enc, b_dec, and e.g. threshold for jumprelu) and SAELens's config
dict in `meta["sae_cfg"]`, so any architecture SAELens can load, trained here or published,
comes back with `SAE.load_from_disk` and every analysis works on all of them.

`sae.load` brings a pretrained SAELens SAE into the store (a local SAELens directory, or a
release name + SAE id when a hub is reachable), checks it reads this model's attention output
(`blocks.L.attn.hook_z`, d_in = n_heads x d_head) and evaluates it like a trained one.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from workbench.errors import WorkbenchError
from sae.outputs import LOADED_SAE
from workbench.methods import register
from workbench.params import require
from workbench.result import Result

Z_HOOK = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


def head_attribution(w_dec: Float[Tensor, "d_sae d_in"], n_heads: int) -> Float[Tensor, "d_sae n_heads"]:
    """Each feature's decoder norm per head slice, normalised to sum to 1 over heads (Kissane et al.)."""
    norms = w_dec.view(w_dec.shape[0], n_heads, -1).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)


def to_inference(training_sae, layer: int, model_name: str, device: str = "cpu"):
    """A trained SAELens TrainingSAE as SAELens's inference SAE on `device`, through SAELens's own save/load."""
    from sae_lens import SAE

    training_sae.cfg.metadata.hook_name = f"blocks.{layer}.attn.hook_z"
    training_sae.cfg.metadata.model_name = model_name
    with tempfile.TemporaryDirectory() as d:
        training_sae.save_model(d)
        return SAE.load_from_disk(d, device=str(device))


def sae_tensors_and_cfg(sae) -> tuple[dict[str, Tensor], dict]:
    """SAELens's on-disk form of an inference SAE: its state dict and config dict."""
    with tempfile.TemporaryDirectory() as d:
        sae.save_model(d)
        return load_file(str(Path(d) / "sae_weights.safetensors")), json.loads((Path(d) / "cfg.json").read_text())


def load_sae(result: Result, device: str = "cpu"):
    """The SAELens SAE of a stored `sae.train` / `sae.load` result, on `device` (the model's, to run with it)."""
    from sae_lens import SAE

    cfg = result.meta.get("sae_cfg")
    if cfg is None:
        raise WorkbenchError(f"run {result.run_id} is not an SAE (it is '{result.meta.get('spec', {}).get('method')}'); "
                             "name an SAE run (sae.train or sae.load)")
    names = result.meta["sae_tensors"]
    with tempfile.TemporaryDirectory() as d:
        save_file({k: result.tensors[k].contiguous() for k in names}, str(Path(d) / "sae_weights.safetensors"))
        (Path(d) / "cfg.json").write_text(json.dumps(cfg))
        sae = SAE.load_from_disk(d, device=str(device))
    sae.eval()
    return sae


def sae_of(result: Result, device: str = "cpu") -> tuple[object, int]:
    """(SAE on `device`, layer) of a stored SAE run (a method's `needs` guarantee it is of the same model)."""
    return load_sae(result, device), int(result.meta["layer"])


def check_attention_sae(hook: str | None, d_in: int, model) -> int:
    """The layer of an attention-output SAE for `model`; refuses another hook or a d_in that does not fit."""
    match = Z_HOOK.match(hook or "")
    if match is None:
        raise WorkbenchError(f"the SAE reads '{hook}', not an attention output; Workbench analyses SAEs on "
                             "blocks.L.attn.hook_z (all heads concatenated): choose an attention-output SAE")
    layer = int(match.group(1))
    if not 0 <= layer < model.n_layers:
        raise WorkbenchError(f"the SAE reads layer {layer}, but the model has layers 0..{model.n_layers - 1}")
    width = model.n_heads * model.d_head
    if d_in != width:
        raise WorkbenchError(f"the SAE's d_in is {d_in}, but hook_z of this model has n_heads x d_head = "
                             f"{model.n_heads} x {model.d_head} = {width} inputs; use an SAE trained on this model")
    return layer


def sae_result(sae, model, layer: int, metrics: dict[str, float], extra_meta: dict,
               extra_tensors: dict[str, Tensor] | None = None, extra_frames: list[pd.DataFrame] = ()) -> Result:
    """One stored SAE: SAELens tensors + config, evaluation metrics, head attribution per feature."""
    tensors, cfg = sae_tensors_and_cfg(sae)
    w_dec = tensors["W_dec"].float()
    attribution = head_attribution(w_dec, model.n_heads)
    d_sae = w_dec.shape[0]
    frames = [pd.DataFrame({"component": "model", "layer": layer, "metric": list(metrics), "value": list(metrics.values())}),
              pd.DataFrame({"component": "sae_feature", "layer": layer,
                            "head": torch.arange(model.n_heads).repeat(d_sae).numpy(),
                            "feature": torch.arange(d_sae).repeat_interleave(model.n_heads).numpy(),
                            "metric": "head_attribution", "value": attribution.flatten().numpy()}),
              *extra_frames]
    meta = {"hook": f"blocks.{layer}.attn.hook_z", "layer": layer, "d_in": w_dec.shape[1], "d_sae": d_sae, "sae_cfg": cfg,
            "sae_tensors": sorted(tensors), "architecture": cfg.get("architecture"), **extra_meta,
            "tensor_dims": {"W_enc": ["d_in", "d_sae"], "W_dec": ["d_sae", "d_in"], "head_attribution": ["d_sae", "head"]}}
    return Result(pd.concat(frames, ignore_index=True), tensors={**tensors, "head_attribution": attribution, **(extra_tensors or {})},
                  meta=meta)


@dataclass(frozen=True)
class SAELoadParams:
    path: str = ""
    release: str = ""
    sae_id: str = ""
    eval_prompts: int = 32

    def __post_init__(self):
        require(bool(self.path) != bool(self.release),
                "give either path (a SAELens SAE directory) or release + sae_id (needs a hub), not both or neither")
        require(not self.release or bool(self.sae_id), "a release needs an sae_id (SAELens's pretrained_saes.yaml lists them)")
        require(self.eval_prompts >= 1, f"eval_prompts = {self.eval_prompts} must be at least 1")


@register("sae.load", SAELoadParams,
          "bring a pretrained SAELens attention-output SAE (local directory or release + id) into the store and evaluate it",
          LOADED_SAE)
def sae_load(model, task, params: SAELoadParams, ctx) -> Result:
    from sae_lens import SAE

    from sae.evaluation import evaluate

    if params.path:
        path = Path(params.path).expanduser()
        if not (path / "cfg.json").is_file():
            raise WorkbenchError(f"{path} is not a SAELens SAE directory (no cfg.json); save one with sae.save_model(dir)")
        sae = SAE.load_from_disk(str(path), device=str(model.device))
        source = {"path": str(path.resolve())}
    else:
        try:
            sae = SAE.from_pretrained(params.release, params.sae_id, device=str(model.device))
        except Exception as e:  # no hub, unknown release or id
            raise WorkbenchError(f"could not load SAE '{params.release}' / '{params.sae_id}' ({type(e).__name__}: {e}); "
                                 "check the names, or download it and give its directory as path") from None
        source = {"release": params.release, "sae_id": params.sae_id}
    sae.eval()
    layer = check_attention_sae(sae.cfg.metadata.hook_name, sae.cfg.d_in, model)
    metrics = evaluate(model, task, layer, sae, range(min(params.eval_prompts, len(task))))
    return sae_result(sae, model, layer, metrics, {"source": source})
