"""Where computation runs: the device (CPU or a CUDA GPU) and the CPU threads a step may use.

The one place that turns a requested device (``auto``, ``cpu``, ``cuda``) into the one a step
uses, so a missing GPU is the same clear error from every command, and the one way to change
PyTorch's thread count for a block of code and put it back afterwards (a Nipype worker or a
library caller keeps its own setting).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from smoulder.errors import ConfigError

#: Devices a user may ask for.
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> str:
    """Return ``cuda`` or ``cpu`` for a requested device (``auto`` picks CUDA when present).

    Raises:
        ConfigError: an unknown device, or CUDA requested where PyTorch sees no GPU.

    Examples:
        >>> resolve_device("cpu")
        'cpu'
        >>> resolve_device("tpu")
        Traceback (most recent call last):
        ...
        smoulder.errors.ConfigError: --device: expected auto, cpu or cuda, found 'tpu'
    """
    if requested not in DEVICES:
        raise ConfigError(f"--device: expected auto, cpu or cuda, found {requested!r}")
    if requested == "cpu":
        return "cpu"
    import torch  # deferred: torch takes seconds to import

    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ConfigError(
            "--device cuda: expected a CUDA GPU visible to PyTorch, found none "
            "(install a CUDA build of torch, or run with --device cpu)"
        )
    return "cuda" if has_cuda else "cpu"


def available_cpus() -> int:
    """Return the number of CPUs this process may run on (its affinity, e.g. a Slurm job's).

    Examples:
        >>> available_cpus() >= 1
        True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with PyTorch using ``threads`` CPU threads, then restore the previous count.

    ``None`` leaves the count as it is.

    Examples:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
