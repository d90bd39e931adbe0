"""The torch backend: the reference implementation of the contract (and the oracle in float64).

It follows the math page literally -- form each head's output r = z W_O, centre the direction,
take the dots -- in token chunks so memory stays bounded. No identity that changes rounding is used.
Tests and benchmarks import this module; it is never copied.
"""

from __future__ import annotations

import torch

from ..contract import FusedInputs, FusedOutputs

NAME = "torch"
# Bytes of head outputs formed at once: keeps [chunk, N + M, d_model] well inside memory.
_CHUNK_BYTES = 64 << 20


def available() -> tuple[bool, str]:
    return True, f"torch {torch.__version__} (any device, reference math)"


def _directions_for_chunk(inp: FusedInputs, lo: int, hi: int, acc: torch.dtype):
    """Centred directions: [chunk, D] (gathered) or [K, D] (fixed), plus a mask of missing targets."""
    table = inp.directions
    if inp.direction_ids is None:
        d = table.to(acc)
        missing = None
    else:
        ids = inp.direction_ids[lo:hi]
        missing = ids < 0
        d = table.index_select(0, ids.clamp(min=0)).to(acc)
        if inp.incorrect_ids is not None:
            inc = inp.incorrect_ids[lo:hi]
            missing = missing | (inc < 0)
            d = d - table.index_select(0, inc.clamp(min=0)).to(acc)
    if inp.center:
        d = d - d.mean(dim=-1, keepdim=True)
    return d, missing


def run(inp: FusedInputs) -> FusedOutputs:
    """Compute the contract's outputs (see `erasure_fast.contract`)."""
    acc = inp.out_dtype
    T, N, _ = inp.z.shape
    D = inp.W_O.shape[2]
    M = inp.extra_nodes.shape[1]
    W = inp.writers.numel()
    W_O = inp.W_O.to(acc)
    writers = inp.writers
    fixed = inp.direction_ids is None
    K = inp.directions.shape[0]
    dla = torch.empty((T, N, K) if fixed else (T, N), dtype=acc, device=inp.z.device)
    dots = torch.empty((T, N + M, W), dtype=acc, device=inp.z.device)
    norms = torch.empty((T, N + M), dtype=acc, device=inp.z.device) if inp.with_norms else None
    per_token = (N + M) * D * torch.finfo(acc).bits // 8
    chunk = max(1, _CHUNK_BYTES // max(per_token, 1))
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        r = torch.einsum("tnh,nhd->tnd", inp.z[lo:hi].to(acc), W_O)  # [c, N, D]
        d, missing = _directions_for_chunk(inp, lo, hi, acc)
        s = inp.scale[lo:hi]
        if fixed:
            dla[lo:hi] = torch.einsum("tnd,kd->tnk", r, d) / s[:, None, None]
        else:
            out = torch.einsum("tnd,td->tn", r, d) / s[:, None]
            dla[lo:hi] = out.masked_fill(missing[:, None], float("nan"))
        nodes = torch.cat([r, inp.extra_nodes[lo:hi].to(acc)], dim=1) if M else r
        rw = r.index_select(1, writers)  # [c, W, D]
        dots[lo:hi] = torch.einsum("tad,twd->taw", nodes, rw)
        if norms is not None:
            norms[lo:hi] = (nodes * nodes).sum(dim=-1)
    return FusedOutputs(dla=dla, dots=dots, norms=norms)
