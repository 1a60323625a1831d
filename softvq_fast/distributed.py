"""This process's place under torchrun: its device and the process group, shared by the commands
(encode-dataset, sample: gloo barriers only) and the training loop (NCCL on GPUs)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def local_rank() -> int:
    """LOCAL_RANK as torchrun sets it (0 in a plain process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def process_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested`, else a GPU if there is one, else the CPU. An index-less CUDA device is the GPU
    of LOCAL_RANK (modulo the visible GPUs: a launcher may show each process only its own); a
    CUDA device becomes the current one. ValueError naming the device where CUDA is missing."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def join_process_group(backend: str, timeout: timedelta, device: torch.device | None = None) -> bool:
    """Joins torchrun's process group when WORLD_SIZE > 1 and none is joined yet; True when this
    call joined it (and so should end it). `device`: the CUDA device NCCL binds to, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return False
    bound = device if device is not None and device.type == "cuda" else None
    dist.init_process_group(backend=backend, timeout=timeout, device_id=bound)
    return True


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
