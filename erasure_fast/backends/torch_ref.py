"""The torch backend: the reference implementation of the contract (and the oracle in float64).

It follows the math page literally -- form each head's output r = z W_O, centre the direction,
take the dots -- in token chunks so memory stays bounded. No identity that changes rounding is used.
Tests and benchmarks import this module; it is never copied.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import Backend, FusedInputs, FusedOutputs

NAME = "torch"
# Bytes of head outputs formed at once: keeps [chunk, N + M, d_model] well inside memory.
_CHUNK_BYTES = 64 << 20


def available() -> tuple[bool, str]:
    return True, f"torch {torch.__version__} (any device, reference math)"


def chunk_outputs(z: torch.Tensor, extra: torch.Tensor, scale: torch.Tensor, ids: Optional[torch.Tensor],
                  inc: Optional[torch.Tensor], W_O: torch.Tensor, table: torch.Tensor, writers: torch.Tensor,
                  center: bool, with_norms: bool):
    """The contract for one chunk of c tokens, in the accumulation dtype of ``W_O``.

    z [c, N, H], extra [c, M, D], scale [c], ids / inc [c] or None (None ids = fixed-set mode),
    W_O [N, H, D], table [K, D], writers [W]. Returns (dla [c, N] or [c, N, K], dots [c, N+M, W],
    norms [c, N+M] or None)."""
    acc = W_O.dtype
    r = torch.einsum("tnh,nhd->tnd", z.to(acc), W_O)  # [c, N, D]
    if ids is None:
        d = table.to(acc)
    else:
        missing = ids < 0
        d = table.index_select(0, ids.clamp(min=0)).to(acc)
        if inc is not None:
            missing = missing | (inc < 0)
            d = d - table.index_select(0, inc.clamp(min=0)).to(acc)
    if center:
        d = d - d.mean(dim=-1, keepdim=True)
    if ids is None:
        dla = torch.einsum("tnd,kd->tnk", r, d) / scale[:, None, None]
    else:
        dla = (torch.einsum("tnd,td->tn", r, d) / scale[:, None]).masked_fill(missing[:, None], float("nan"))
    nodes = torch.cat([r, extra.to(acc)], dim=1) if extra.shape[1] else r
    dots = torch.einsum("tad,twd->taw", nodes, r.index_select(1, writers))
    norms = (nodes * nodes).sum(dim=-1) if with_norms else None
    return dla, dots, norms


def run(inp: FusedInputs) -> FusedOutputs:
    """Compute the contract's outputs (see `erasure_fast.contract`), chunk by chunk."""
    return _run_chunked(inp, chunk_outputs)


def _run_chunked(inp: FusedInputs, chunk_fn: Callable) -> FusedOutputs:
    """`run` with each chunk computed by ``chunk_fn`` (`chunk_outputs`, or a compiled copy of it:
    `TorchBackend.compiled`)."""
    acc = inp.out_dtype
    T, N, _ = inp.z.shape
    D = inp.W_O.shape[2]
    M = inp.extra_nodes.shape[1]
    W = inp.writers.numel()
    W_O = inp.W_O.to(acc)
    fixed = inp.direction_ids is None
    K = inp.directions.shape[0]
    dla = torch.empty((T, N, K) if fixed else (T, N), dtype=acc, device=inp.z.device)
    dots = torch.empty((T, N + M, W), dtype=acc, device=inp.z.device)
    norms = torch.empty((T, N + M), dtype=acc, device=inp.z.device) if inp.with_norms else None
    per_token = (N + M) * D * torch.finfo(acc).bits // 8
    chunk = max(1, _CHUNK_BYTES // max(per_token, 1))
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        sl = slice(lo, hi)
        c_dla, c_dots, c_norms = chunk_fn(
            inp.z[sl], inp.extra_nodes[sl], inp.scale[sl],
            None if fixed else inp.direction_ids[sl],
            None if inp.incorrect_ids is None else inp.incorrect_ids[sl],
            W_O, inp.directions, inp.writers, inp.center, inp.with_norms,
        )
        dla[sl], dots[sl] = c_dla, c_dots
        if norms is not None:
            norms[sl] = c_norms
    return FusedOutputs(dla=dla, dots=dots, norms=norms)


class TorchBackend(Backend):
    """The reference implementation (any device; the float64 oracle)."""

    name = NAME

    def __init__(self):
        self._chunk_fn = chunk_outputs

    def available(self) -> tuple[bool, str]:
        return available()

    def run(self, inputs: FusedInputs) -> FusedOutputs:
        return _run_chunked(inputs, self._chunk_fn)

    def compiled(self, compiler: Callable[[Callable], Callable]) -> "TorchBackend":
        """A new torch backend whose per-chunk function is ``compiler(chunk_outputs)`` (e.g.
        ``torch.compile``; the token loop stays in Python, so the graph is not unrolled over chunks)."""
        out = TorchBackend()
        out._chunk_fn = compiler(chunk_outputs)
        return out
