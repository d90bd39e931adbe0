"""Multi-process scans on torch.distributed: ranks take disjoint batches, aggregates are reduced."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of an initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_true(flag: bool) -> bool:
    """True when ``flag`` is True on every rank (a collective: every rank must call it); the flag
    itself without a process group."""
    if rank_and_world()[1] == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def all_reduce_sum(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Element-wise sum of same-shaped numpy arrays over all ranks (exact for integers)."""
    dev = _device()
    out = {}
    for key in sorted(arrays):  # same order on every rank
        t = torch.from_numpy(np.ascontiguousarray(arrays[key])).to(dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        out[key] = t.cpu().numpy()
    return out


def all_gather(arrays: Dict[str, np.ndarray]) -> List[Dict[str, np.ndarray]]:
    """Every rank's copy of ``arrays`` (same shapes on all ranks), in rank order."""
    dev = _device()
    world = torch.distributed.get_world_size()
    per_rank: List[Dict[str, np.ndarray]] = [dict() for _ in range(world)]
    for key in sorted(arrays):
        t = torch.from_numpy(np.ascontiguousarray(arrays[key])).to(dev)
        bufs = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(bufs, t)
        for r in range(world):
            per_rank[r][key] = bufs[r].cpu().numpy()
    return per_rank
