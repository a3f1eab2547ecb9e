"""Choosing the torch device of a command line's ``--device`` option."""

from __future__ import annotations

import os

import torch

from cli_shell import UserError


class DeviceUnavailable(UserError, ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when available; a bare ``cuda`` under torchrun takes the rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"--device {name} requested but CUDA is not available (use --device cpu)")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown --device {name!r} (use cpu, cuda, cuda:N or auto)") from None


def default_workers(cap: int = 4) -> int:
    """Data-loading processes: ``cap``, or fewer on a machine with fewer usable CPU cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cores))
