"""Shared fixtures: a tiny TransformerLens model built in-process, the embedded model, a temporary store.

The suite never touches the user's store: WORKBENCH_HOME points at a temporary directory for the
whole session. The model cache (WORKBENCH_CACHE) is shared, so the embedded model is converted
once per machine, as a user would see it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
WORKBENCH = str(Path(sys.executable).parent / "workbench")


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("workbench_home")
    os.environ["WORKBENCH_HOME"] = str(home)
    yield home


def make_toy_tl(n_layers=2, n_heads=4, d_head=8, d_vocab=50, n_ctx=64, seed=0, attn_only=True, normalization_type="LN",
                act_fn=None, **extra):
    """A small random HookedTransformer (no tokenizer): token ids in, logits out; MLPs are GELU
    unless `act_fn` says otherwise."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.models import default_device

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_model=n_heads * d_head, d_vocab=d_vocab,
        n_ctx=n_ctx, attn_only=attn_only, act_fn=None if attn_only else act_fn or "gelu", seed=seed,
        normalization_type=normalization_type, init_weights=True, device=default_device(), **extra,
    )
    tl = HookedTransformer(cfg)
    tl.eval()
    return tl


class DispatchedOps(TorchDispatchMode):
    """The names of the operators dispatched inside it, in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """A TransformerLens toy-model directory as researchers share them: config.json + model.safetensors."""
    from workbench.models import save_tl_dir

    path = tmp_path_factory.mktemp("toy") / "toy-attn-2l"
    save_tl_dir(make_toy_tl(), path)
    return path


@pytest.fixture(scope="session")
def toy(toy_dir):
    from workbench.models import load_model

    return load_model(str(toy_dir))


@pytest.fixture(scope="session")
def smollm2():
    from workbench.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """A store filled by `workbench demo --no-serve` once per session, whichever test asks first:
    the demo test checks what it printed, and the notebooks read the embedded model's standard
    analyses from it as a user's notebook meets their store (so no test depends on test order)."""
    import subprocess

    store = tmp_path_factory.mktemp("embedded") / "store"
    proc = subprocess.run([WORKBENCH, "demo", "--no-serve", "--store", str(store)], capture_output=True, text=True,
                          timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, proc


def needs(package: str):
    """Skip, saying why, where a dependency `make test` installs is missing (a bare GPU machine's image)."""
    from importlib.util import find_spec

    return pytest.mark.skipif(find_spec(package) is None, reason=f"{package} is not installed here (`make test` installs it)")


SLOW_FIXTURES = {"smollm2", "demo_store", "ray_head"}


def pytest_collection_modifyitems(items):
    """`slow` = loads the embedded model (directly or through the demo's store) or starts Ray: `pytest -m "not slow"`
    is the fast lane for iteration; `make test` runs everything."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture()
def store(tmp_path):
    from workbench.store import Store

    return Store(tmp_path / "store")


def pytest_addoption(parser):
    parser.addoption("--host-only", action="store_true",
                     help="on a machine without a GPU, keep models on the host instead of the emulated second device")


def pytest_configure(config):
    """Without a GPU, models under test go to an emulated second device (tests/emulated_device.py), so
    a test or method that mixes host and device tensors fails here as it would on a GPU."""
    if torch.cuda.is_available() or config.getoption("--host-only"):
        return
    from emulated_device import install

    install()
