"""The `Model` wrapper every method takes: a TransformerLens `HookedTransformer` (`model.tl`) with its
tokenizer, shapes and an identity (name + weights hash + tokenization choices) the store keys on.

Computation goes through TransformerLens directly (`model.tl`: hooks, `run_with_cache`,
`start_at_layer`); the wrapper is for what TransformerLens does not know: the identity, the
tokenization convention (BOS or not) and shapes read without loading the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from workbench.errors import WorkbenchError

@dataclass(frozen=True)
class ModelIdentity:
    """Everything about a loaded model that can change a result; the store keys on it."""

    name: str
    weights_hash: str
    prepend_bos: bool
    dtype: str
    source: str
    tf32: bool = False  # float32 matrix products on TF32 tensor cores (CUDA only)

    def key(self) -> dict[str, Any]:
        key = {"name": self.name, "weights_hash": self.weights_hash, "prepend_bos": self.prepend_bos, "dtype": self.dtype}
        return {**key, "tf32": True} if self.tf32 else key


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

    @contextmanager
    def precision(self) -> Iterator[None]:
        """Compute with this model's matrix-product precision (TF32 or not), restoring the process's."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.identity.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

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

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, layers={self.n_layers}, heads={self.n_heads}, kv_heads={self.n_kv_heads}, "
            f"d_head={self.d_head}, weights={self.identity.weights_hash[:12]}, loaded={self.loaded})"
        )
