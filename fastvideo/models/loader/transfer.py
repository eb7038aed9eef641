"""Moving a loaded module's weights to the GPU with several host threads.

A library model (UMT5-XXL: 11 GB in bf16) is loaded with its tensors mapped from the
safetensors file, and `module.to("cuda")` then copies them one after the other from
pageable memory: one host thread faulting the pages in and copying them through the
driver's staging buffers, the GPU's copy engines mostly waiting. The copies release the
GIL, so a few threads moving different tensors keep the engines busy. The result is what
`module.to(device)` gives: the same values, the same Parameter objects (tied weights
stay tied), buffers moved too.

Our own models (the DiT) are built on the device and copy the checkpoint's tensors into
their parameters one by one (`load_weights`); `staged` hands them the tensors already
copied to the device by such threads, a few ahead of the one being loaded.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

LOAD_THREADS_ENV = "FASTVIDEO_LOAD_THREADS"
DEFAULT_THREADS = 8


def load_threads() -> int:
    """Host threads for a module's move to the GPU (`FASTVIDEO_LOAD_THREADS`, default 8;
    1 is `module.to(device)`)."""
    value = os.environ.get(LOAD_THREADS_ENV, str(DEFAULT_THREADS))
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{LOAD_THREADS_ENV}={value!r}; allowed: an integer >= 1")
    return threads


def _copy_threads(device: torch.device, threads: int | None) -> int:
    """Threads to copy with (default `load_threads()`); 1 off CUDA: a plain copy there."""
    return (load_threads() if threads is None else threads) if device.type == "cuda" else 1


def to_device(module: nn.Module, device: str | torch.device,
              threads: int | None = None) -> nn.Module:
    """`module.to(device)`, its tensors copied by `threads` host threads (default
    `load_threads()`) when they go to a CUDA device."""
    device = torch.device(device)
    threads = _copy_threads(device, threads)
    if threads <= 1:
        return module.to(device)
    return copy_tensors(module, lambda t: t.to(device), threads, skip=lambda t: t.device == device)


def copy_tensors(module: nn.Module, copy: Callable[[torch.Tensor], torch.Tensor],
                 threads: int, skip: Callable[[torch.Tensor], bool] = lambda t: False
                 ) -> nn.Module:
    """Replace every parameter's and buffer's data by `copy(tensor)`, the copies made on
    `threads` threads, each shared tensor once; the Parameter objects stay (so do ties)."""
    unique = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())
              if not skip(t)}
    # Largest first, so no thread is left with a big one at the end.
    order = sorted(unique, key=lambda key: -unique[key].nbytes)
    with ThreadPoolExecutor(threads, thread_name_prefix="to-device") as pool, torch.no_grad():
        copies = dict(zip(order, pool.map(lambda key: copy(unique[key].detach()), order)))
    return module._apply(lambda t: copies.get(id(t), t))


def staged(weights: Iterator[tuple[str, torch.Tensor]],
           copy: Callable[[torch.Tensor], torch.Tensor], threads: int,
           ahead: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, copy(tensor))` for each of `weights`, in order, the copies made on `threads`
    threads at most `ahead` (default 2 x threads) tensors ahead of the consumer."""
    ahead = 2 * threads if ahead is None else ahead
    window: deque[tuple[str, Future[torch.Tensor]]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="to-device") as pool:
        for name, tensor in weights:
            window.append((name, pool.submit(copy, tensor)))
            if len(window) >= ahead:
                done_name, future = window.popleft()
                yield done_name, future.result()
        while window:
            done_name, future = window.popleft()
            yield done_name, future.result()


def weights_to_device(weights: Iterator[tuple[str, torch.Tensor]], device: str | torch.device,
                      threads: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` copied to a CUDA `device` on `threads` threads (default `load_threads()`)
    ahead of their use; elsewhere (or one thread) as they are."""
    device = torch.device(device)
    threads = _copy_threads(device, threads)
    if threads <= 1:
        return weights
    return staged(weights, lambda t: t.to(device), threads)
