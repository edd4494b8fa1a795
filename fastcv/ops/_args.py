"""Argument helpers shared by the ops: sizes as PyTorch takes them, and memory layouts."""
from __future__ import annotations

import torch

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def pair(value, arg: str) -> tuple[int, int]:
    """An int or a pair of ints (as torch.nn.functional takes sizes) -> a pair; TypeError otherwise."""
    if type(value) is int:  # the common cases first: every call of an op with sizes runs this
        return (value, value)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    if isinstance(value, int):
        value = (value, value)
    result = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(result) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in result):
        raise TypeError(f"{arg} must be an int or a pair of ints, got {value!r}")
    return result


def channels_last(t: torch.Tensor) -> bool:
    """Whether t is laid out channels_last (4-D) or channels_last_3d (5-D) and is not also plain
    contiguous (a tensor with one channel, or 1x1 planes, is both: PyTorch counts it as contiguous)."""
    fmt = _CHANNELS_LAST.get(t.dim())
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def memory_format(*tensors: torch.Tensor) -> torch.memory_format:
    """The memory format of an output computed from `tensors`: channels_last (or channels_last_3d) when
    any of them is, else contiguous, as PyTorch decides for convolutions and pooling."""
    for t in tensors:
        if channels_last(t):
            return _CHANNELS_LAST[t.dim()]
    return torch.contiguous_format
