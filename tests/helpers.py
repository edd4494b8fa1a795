"""Inputs shared by the tests."""
import torch


def random_boxes(n, *, size=100.0, max_wh=20.0, dtype=torch.float32, device="cpu", generator=None):
    """n boxes (x1, y1, x2, y2) with corners in [0, size) and sides up to max_wh: plenty of overlaps."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_wh
    return torch.cat([xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def distinct_scores(n, *, dtype=torch.float32, device="cpu", generator=None):
    """Scores with no ties even in float16 (up to 2048 of them) or bfloat16 (up to 256)."""
    levels = {torch.float16: 2048, torch.bfloat16: 256}.get(dtype, 1 << 20)
    assert n <= levels
    picks = torch.randperm(levels, generator=generator)[:n].to(torch.float64)
    return (picks / levels).to(dtype=dtype, device=device)
