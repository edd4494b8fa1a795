"""Argument helpers shared by the ops' public functions."""
from __future__ import annotations


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
