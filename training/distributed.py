"""Process-group setup for torchrun and SLURM, and the few collective helpers the loops need."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list (``node[01-04,07]`` -> ``node01``)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # scontrol is missing on some login setups: expand the first bracket by hand.
        match = re.match(r"([^\[,]+)(?:\[([^\],-]+))?", nodelist)
        if not match:
            return nodelist
        return match.group(1) + (match.group(2) or "")


def _env_from_slurm() -> None:
    """Fill the torch.distributed ``env://`` variables from a ``srun`` task's SLURM variables."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group described by the environment (torchrun or SLURM), if any.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.local_rank`` and, on CUDA,
    binds the process to its local GPU. A lone process (no launcher variables) runs undistributed.
    ``args.dist_backend`` "auto" means NCCL on CUDA and gloo on CPU.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _env_from_slurm()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        args.distributed, args.rank, args.world_size, args.local_rank = False, 0, 1, 0
        return
    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.distributed = True
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
        args.device = f"cuda:{args.local_rank}"
    backend = args.dist_backend if args.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    args.dist_backend = backend
    dist.init_process_group(
        backend=backend,
        init_method=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        timeout=datetime.timedelta(minutes=30),
    )
    dist.barrier()


def destroy_distributed() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op when undistributed) and return it."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()
