"""Index validation: exact ValueError on CPU tensors, no value reads on fake / meta tensors (so a
whole step can be traced without data), and a device-side assertion (no host sync) on CUDA."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tec_fast import ops
from tec_fast.ops.validate import check_index, check_index_values


def test_cpu_out_of_range_is_a_value_error():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"ids_keep holds indices in \[0, 5\], outside \[0, 5\)"):
        ops.masked_gather(x, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        check_index_values(torch.tensor([-1]), "idx", 4)


def test_fake_and_meta_tensors_are_not_read():
    check_index_values(torch.tensor([7], device="meta"), "idx", 4)
    with FakeTensorMode():
        x = torch.randn(2, 5, 3)
        ids = torch.zeros(2, 2, dtype=torch.long)
        out = ops.masked_gather(x, ids)  # would raise on a .tolist() of a fake tensor
        assert out.shape == (2, 2, 3)


def test_shape_dtype_device_are_still_checked_on_meta():
    with pytest.raises(ValueError, match="must be int64 or int32"):
        check_index(torch.zeros(1, device="meta"), "idx", (1,), torch.device("meta"))
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        check_index(torch.zeros(3, dtype=torch.long, device="meta"), "idx", (2,), torch.device("meta"))


@pytest.mark.gpu
def test_cuda_check_does_not_synchronise():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(2, 5, 3, device="cuda")
    ids = torch.tensor([[0, 4], [1, 2]], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_gather(x, ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
