"""The Triton RoI Align forward (kernels/roi_align.py): on the CPU through the interpreter (small
shapes), on the GPU compiled; against torchvision."""
import pytest
import torch
import torchvision

from fastcv.kernels import roi_align as triton_roi_align
from conftest import triton_device
from helpers import assert_sums_close, make_rois


@pytest.fixture
def device():
    return triton_device()


# Each output is an average of bilinear interpolations, a sum of products with weights that are not
# negative: allowed SUM_UNITS float32 unit roundoffs of the same average of |x| (helpers.assert_sums_close),
# plus the final rounding of float16 results. Measured under the interpreter: 0 (float32 bit for bit with
# torchvision, float16 its result rounded); the margin is for a GPU's contractions into FMAs.
SUM_UNITS = 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, -1), (True, 0), (False, 1)])
def test_triton_forward_matches_torchvision(device, dtype, channels_last, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(sampling_ratio + 3)
    x = torch.randn(2, 5, 9, 11, generator=g)
    rois = make_rois(6, 2, 9, 11, 0.5, g, dtype=torch.float32)
    rois[0, 0] = 7.0  # a batch index outside the batch: zeros, no read outside
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xd, rd = x.to(device=device, dtype=dtype), rois.to(device=device, dtype=dtype)
    out = torch.empty(6, 5, 3, 2, device=device, dtype=dtype)
    triton_roi_align.roi_align_forward(xd, rd.contiguous(), 0.5, 3, 2, sampling_ratio, aligned, out)
    # torchvision in float32 on the values the kernel sees (the input and boxes rounded to dtype)
    xs, rs = xd.cpu().float(), rd[1:].cpu().float()
    ref = torchvision.ops.roi_align(xs, rs, (3, 2), 0.5, sampling_ratio, aligned)
    magnitude = torchvision.ops.roi_align(xs.abs(), rs, (3, 2), 0.5, sampling_ratio, aligned)
    assert_sums_close(out[1:], ref, magnitude, dtype, SUM_UNITS)
    assert torch.equal(out[0].float().cpu(), torch.zeros(5, 3, 2))
