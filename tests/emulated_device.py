"""A second device on a CPU-only machine, for catching what would fail on a GPU.

On a machine without a GPU the suite (conftest; `--host-only` turns it off) puts every model it
builds on `cpu:0` and runs under `EmulatedDevice`: tensors on that "device" (parameters moved
there, whatever is computed from them, whatever is made with `device=` set to it) are told apart
from tensors on the host (made with no device, or moved with `.cpu()`), and an operator mixing
the two raises as CUDA would, as does `.numpy()` of a device tensor. Tensors report `cpu:0` as their device, so `x.device` carries
the distinction into factories. The arithmetic is the CPU's: results are unchanged.

Why by hand: PyTorch has no CPU-backed stand-in for a second device, and a CUDA test machine is
not always at hand; without this, a test comparing a CPU reference with a model's output passes
on every CPU run and fails on the first GPU.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

DEVICE = torch.device("cpu", 0)
DEV, HOST = "device", "host"
# cross-device by design (moves, copies), or reading no values
NO_CHECK = {"to", "cpu", "cuda", "copy_", "type_as", "set_", "pin_memory", "_has_compatible_shallow_copy_type",
            "is_same_size", "is_set_to"}


def _wrapped(tensor: torch.Tensor) -> bool:
    """A tensor inside a functorch transform (vjp, vmap): it keeps no attributes of its own."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def place(tensor: torch.Tensor) -> str | None:
    where = getattr(tensor, "_emulated_place", None)
    return None if where is None or _wrapped(tensor) else where  # not tracked inside a transform


def mark(tensor: torch.Tensor, where: str | None) -> None:
    if where is not None and not _wrapped(tensor):
        try:
            tensor._emulated_place = where
        except (AttributeError, RuntimeError):  # a tensor type that keeps no attributes
            pass


def _tensors(obj, found: list) -> list:
    """The tensors in an operator's arguments or result (torch's tree_flatten, less its generality: it
    runs on every operator, and the general walk made the emulated suite twice as slow)."""
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, found)
    return found


def _place_of_device(device) -> str | None:
    if device is None:
        return None
    if isinstance(device, int):
        return DEV
    device = torch.device(device)
    if device.type == "cpu":
        return DEV if device.index is not None else HOST
    return DEV if device.type == "cuda" else None  # meta tensors (models built empty, then loaded) are not tracked


def _target(name: str, args, kwargs) -> tuple[bool, str | None]:
    """(whether the call names where its output goes, and where) for factories and moves."""
    if "device" in kwargs:
        return True, _place_of_device(kwargs["device"])
    if name == "cpu":
        return True, HOST
    if name == "cuda":
        return True, DEV
    if name == "to":
        for arg in args[1:]:
            if isinstance(arg, torch.Tensor):
                return True, place(arg)
            if isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool):
                return True, _place_of_device(arg)
    if name == "type_as":
        return True, place(args[1])
    return False, None


class EmulatedDevice(TorchFunctionMode):
    """Tracks host and device tensors through every operator and raises where CUDA would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            if attribute == "device" and (place(args[0]) == DEV or _wrapped(args[0])) and func(args[0]).type == "cpu":
                return DEVICE  # functorch transforms here run over model activations only
            if attribute == "is_cuda" and place(args[0]) == DEV:
                return False
            out = func(*args, **kwargs)  # an attribute: a tensor read from one (`.grad`, `.data`) is where it is
            if isinstance(out, torch.Tensor) and out is not args[0]:
                mark(out, place(args[0]))
            return out
        if name == "__set__":  # `param.data = tensor`: the parameter is now where that tensor is
            out = func(*args, **kwargs)
            if getattr(getattr(func, "__self__", None), "__name__", "") == "data" and isinstance(args[1], torch.Tensor):
                mark(args[0], place(args[1]))
            return out
        inputs = _tensors(kwargs, _tensors(args, []))
        places = [place(t) for t in inputs]
        self._check(name, func, args, inputs, places)
        out = func(*args, **kwargs)
        named, where = _target(name, args, kwargs)
        if not named:
            where = DEV if DEV in places else HOST if HOST in places else (HOST if not inputs else None)
        if (named and where is not None and isinstance(out, torch.Tensor) and out is args[0] and not _wrapped(out)
                and place(out) != where):
            if isinstance(out, torch.nn.Parameter) and where == DEV:
                mark(out, DEV)  # a module's parameter moves with it
                return out
            out = out.view_as(out)  # a moved copy is a new tensor; the original stays where it was
        seen = {id(t) for t in inputs}
        for tensor in _tensors(out, []):
            if id(tensor) not in seen:
                mark(tensor, where)
        return out

    @staticmethod
    def _check(name: str, func, args, inputs: list[torch.Tensor], places: list[str | None]) -> None:
        if name in ("numpy", "__array__") and inputs and places[0] == DEV:
            raise TypeError("can't convert an (emulated) device tensor to numpy; use .cpu() first")
        if name == "__getitem__" or name == "__setitem__":
            indices = _tensors(args[1], [])
            if place(args[0]) == HOST and any(place(i) == DEV for i in indices):
                raise RuntimeError(f"{name}: a host tensor indexed with (emulated) device indices")
            if name == "__setitem__" and indices and isinstance(args[2], torch.Tensor) and args[2].dim() > 0:
                if {place(args[0]), place(args[2])} == {DEV, HOST}:
                    raise RuntimeError("__setitem__: values and tensor on different (emulated) devices")
            return
        if name in NO_CHECK:
            return
        if DEV in places and any(p == HOST and t.dim() > 0 for t, p in zip(inputs, places)):
            shapes = ", ".join(f"{p} {tuple(t.shape)}" for t, p in zip(inputs, places) if p)
            raise RuntimeError(f"Expected all tensors to be on the same device (emulated): {name or func} got {shapes}")


def patch_safetensors() -> None:
    """safetensors takes device names itself and knows no `cpu:0`: readers asked for the emulated
    device read onto the host (their tensors are not tracked)."""
    import safetensors
    import safetensors.torch

    def host(device):
        return "cpu" if _place_of_device(device) == DEV and torch.device(device).type == "cpu" else device

    opened, loaded = safetensors.safe_open, safetensors.torch.load_file

    def safe_open(filename, framework, device="cpu", **options):
        return opened(filename, framework=framework, device=host(device), **options)

    def load_file(filename, device="cpu"):
        return loaded(filename, device=host(device))

    safetensors.safe_open = safe_open
    safetensors.torch.load_file = load_file


def install() -> None:
    """For the whole session (session fixtures' models are tracked too): workbench's models and the
    suite's toy models go to the emulated device, parameters are where their data was made, and
    every operator runs under `EmulatedDevice`."""
    import workbench.models as models
    import workbench.models.registry as registry

    registry.default_device = models.default_device = lambda: str(DEVICE)
    made = torch.nn.Parameter.__new__

    def parameter(cls, data=None, requires_grad=True):
        out = made(cls, data, requires_grad)
        mark(out, place(data) if data is not None else None)
        return out

    torch.nn.Parameter.__new__ = parameter
    patch_safetensors()
    EmulatedDevice().__enter__()

