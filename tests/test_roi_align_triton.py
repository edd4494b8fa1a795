"""The Triton RoI Align forward (kernels/roi_align.py): on the CPU through the interpreter (small
shapes), on the GPU compiled; against torchvision."""
import pytest
import torch
import torchvision

from fastcv.kernels import roi_align as triton_roi_align
from conftest import triton_device
from test_roi_align import make_rois


@pytest.fixture
def device():
    return triton_device()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, -1), (True, 0), (False, 1)])
def test_triton_forward_matches_torchvision(device, dtype, tol, channels_last, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(sampling_ratio + 3)
    x = torch.randn(2, 5, 9, 11, generator=g)
    rois = make_rois(6, 2, 9, 11, 0.5, g, dtype=torch.float32)
    rois[0, 0] = 7.0  # a batch index outside the batch: zeros, no read outside
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xd, rd = x.to(device=device, dtype=dtype), rois.to(device=device, dtype=dtype)
    out = torch.empty(6, 5, 3, 2, device=device, dtype=dtype)
    triton_roi_align.roi_align_forward(xd, rd.contiguous(), 0.5, 3, 2, sampling_ratio, aligned, out)
    ref = torchvision.ops.roi_align(x.float(), rois[1:].float(), (3, 2), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(out[1:].float().cpu(), ref, rtol=tol, atol=tol)
    assert torch.equal(out[0].float().cpu(), torch.zeros(5, 3, 2))
