"""Small helpers shared by the parallel layers and the process-group code."""

from __future__ import annotations


def divide(numerator: int, denominator: int, what: str = "value") -> int:
    """Return `numerator // denominator`, raising ValueError when it does not divide evenly.

    `what` names the quantity being split, e.g. "output_size 10 of ColumnParallelLinear
    over the tensor parallel size", so the error says which setting to change.
    """
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(f"cannot split {what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator
