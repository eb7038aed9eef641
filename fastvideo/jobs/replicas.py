"""How a job's processes on a node split into model replicas. Imports nothing heavy: the
flows check it at their start, before the engine is imported."""

from __future__ import annotations


def check_sp_size(num_procs: int, sp_size: int | None) -> int:
    """`sp_size` (None: all `num_procs`), or ValueError unless it divides `num_procs`."""
    sp_size = num_procs if sp_size is None else sp_size
    if sp_size < 1 or num_procs % sp_size:
        valid = [d for d in range(1, num_procs + 1) if num_procs % d == 0]
        raise ValueError(f"sp size {sp_size} must divide the {num_procs} denoise processes; "
                         f"sizes that work: {valid}")
    return sp_size
