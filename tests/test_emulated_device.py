"""The emulated second device (on without a GPU; `--host-only` turns it off) refuses what CUDA refuses
and changes no result."""

import pytest
import torch

from emulated_device import DEVICE, EmulatedDevice


def test_mixing_host_and_device_tensors_raises_as_on_a_gpu_and_moving_them_fixes_it():
    with EmulatedDevice():
        layer = torch.nn.Linear(4, 3).to(DEVICE)
        x = torch.randn(2, 4)
        with pytest.raises(RuntimeError, match="same device"):
            layer(x)
        y = layer(x.to(layer.weight.device))
        assert y.device == DEVICE and torch.zeros(3, device=y.device).device == DEVICE
        with pytest.raises(RuntimeError, match="same device"):
            torch.allclose(y, torch.zeros(2, 3))
        with pytest.raises(TypeError, match="numpy"):
            y.detach().numpy()
        assert y.detach().cpu().numpy().shape == (2, 3)
        assert y[torch.tensor([1, 0])].shape == (2, 3)  # host indices into a device tensor are allowed
        with pytest.raises(RuntimeError, match="indexed with"):
            x[torch.tensor([1], device=DEVICE)]
        assert (y + torch.tensor(1.0)).shape == (2, 3)  # a host scalar tensor is allowed
        moved = x.to(DEVICE)
        with pytest.raises(RuntimeError, match="same device"):
            moved + torch.ones(4)  # the moved copy is on the device; x itself stays on the host
        assert (x + torch.ones(4)).shape == (2, 4)
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([y, torch.zeros(2, 3)])  # tensors inside a list argument are checked
        with pytest.raises(RuntimeError, match="same device"):
            torch.add(y, other=torch.zeros(2, 3))  # and keyword arguments
        pair = torch.split(y, 1)  # each tensor of a tuple result stays on the device
        with pytest.raises(RuntimeError, match="same device"):
            pair[1] + torch.zeros(1, 3)
        y.sum().backward()
        with pytest.raises(RuntimeError, match="same device"):
            layer.weight.grad + torch.zeros(3, 4)  # a tensor read from an attribute is where its owner is
    expected = x @ layer.weight.detach().cpu().T + layer.bias.detach().cpu()
    assert torch.allclose(y.detach().cpu(), expected, atol=1e-6)  # the arithmetic is the CPU's
