"""Models: the wrapper (`wrapper`), the TransformerLens directory format (`tl_dir`), Hugging Face
conversion (`hf`), the embedded GGUF model (`gguf`) and loading by name (`registry`)."""

from workbench.models.registry import (
    DEFAULT_MODEL, REGISTRY, check_model_spec, default_device, from_hooked_transformer, load_model,
)
from workbench.models.tl_dir import DTYPES, linear_layout, save_tl_dir, weights_hash
from workbench.models.wrapper import Model, ModelIdentity
from workbench.spec import ModelSpec

__all__ = ["DEFAULT_MODEL", "DTYPES", "REGISTRY", "Model", "ModelIdentity", "ModelSpec", "check_model_spec",
           "default_device", "from_hooked_transformer", "linear_layout", "load_model", "save_tl_dir", "weights_hash"]
