"""Peak tensor memory counted on any device: the figure benchmarks and memory tests read on the CPU."""

import torch

from workbench.device_memory import peak_tensor_bytes

MIB = 2**20


def test_the_peak_counts_storage_alive_at_once_and_nothing_that_existed_before():
    """Hand-counted: two 4 MiB tensors alive, one freed, two more made while the third lives; a view
    and an in-place write add nothing; a layer's weights (made before) are not counted, its input
    and output are."""
    layer = torch.nn.Linear(512, 512)
    outside = torch.zeros(MIB)

    def work():
        a = torch.ones(MIB)  # 4 MiB (float32)
        b = a * 2  # 8 MiB alive
        del a
        c = b + 1  # 8 MiB alive (a freed)
        c[:10].add_(1)  # a view written in place: nothing new
        outside.add_(c)  # written into storage made before: nothing new
        d = torch.empty(2 * MIB).fill_(0)  # 8 MiB more: 16 MiB alive, the peak
        del b, d
        y = layer(torch.ones(512, 512))  # 1 MiB input and 1 MiB output beside c's 4 MiB
        return c[:2], y

    (head, y), peak = peak_tensor_bytes(work)
    assert peak == 16 * MIB
    assert head.tolist() == [4.0, 4.0] and y.shape == (512, 512)
    _, peak = peak_tensor_bytes(lambda: layer(torch.ones(512, 512)))
    assert peak == 2 * MIB
