"""Finiteness checks shared by the contract (`erasure_fast.contract`) and the backends (a DLA table
checks the tensors it is built from). Depends on torch only, so every module can import it."""

from __future__ import annotations

from typing import Optional

import torch

_FINITE_BLOCK = 1 << 20  # elements per block of the finiteness check


def _sum_finite(t: torch.Tensor) -> bool:
    """True proves every value of ``t`` finite, in one read without temporaries (a NaN or an infinity
    makes any sum NaN or infinite); False may also mean finite values overflowing the sum."""
    if t.dtype == torch.float16:
        lo, hi = torch.aminmax(t)
        return bool(torch.isfinite(lo) & torch.isfinite(hi))
    if t.dtype == torch.bfloat16:
        return bool(torch.isfinite(t.sum()))
    return bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)))


def _unravel(i: int, shape) -> list:
    """The multi-index of flat (row-major) index ``i`` in ``shape``."""
    index = []
    for n in reversed(shape):
        i, r = divmod(i, n)
        index.append(r)
    return index[::-1]


def _first_nonfinite(t: torch.Tensor) -> Optional[list]:
    """The index of ``t``'s first NaN or infinity in row-major order, or None when every value is
    finite. Read in blocks (isfinite makes temporaries as large as its input) -- a contiguous tensor's
    flat view in blocks of _FINITE_BLOCK values, any other along dim 0 -- so a value near the start
    is found without reading the rest."""
    if t.dim() == 0:
        return None if bool(torch.isfinite(t)) else []
    if t.is_contiguous():
        flat = t.view(-1)
        for i0 in range(0, flat.numel(), _FINITE_BLOCK):
            bad = ~torch.isfinite(flat[i0:i0 + _FINITE_BLOCK])
            if bool(bad.any()):
                return _unravel(i0 + int(bad.nonzero()[0, 0]), t.shape)
        return None
    step = max(1, _FINITE_BLOCK // max(1, t[0].numel()))
    for i0 in range(0, t.shape[0], step):
        bad = ~torch.isfinite(t[i0:i0 + step])
        if bool(bad.any()):
            first = bad.nonzero()[0].tolist()
            first[0] += i0
            return first
    return None


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite. A finite sum proves it in one read without temporaries:
    ~14x faster than isfinite on a K1-sized z. Half types are not summed into float32, which torch
    does only through a converted copy (19 ms against 0.7 ms on a K1-sized z, 2 threads): bfloat16 is
    summed in its own type (float32's range), float16, whose sums overflow at 65504, by its smallest
    and largest value (aminmax propagates NaN; an infinity is one of them). Only a non-finite result
    -- a bad value, or finite values overflowing the sum -- leads to the exact check, block by block
    (`_first_nonfinite`)."""
    return t.numel() == 0 or _sum_finite(t) or _first_nonfinite(t) is None


def _rows_finite(t: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether rows ``rows`` of ``t`` are all finite. Rows of a matrix: the column sums of those rows
    in one read, without copying them (embedding_bag; half the time of a gathered copy and its sum),
    with the copy's exact check behind a non-finite sum; float16, whose sums overflow early, and other
    shapes check the copy."""
    if t.dim() == 2 and t.dtype != torch.float16:
        offsets = torch.zeros(1, dtype=torch.int64, device=t.device)
        if bool(torch.isfinite(torch.nn.functional.embedding_bag(rows, t, offsets, mode="sum")).all()):
            return True
    return all_finite(t.index_select(0, rows))


def require_finite(name: str, t: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
    """ValueError naming ``name`` and the first bad index unless every value of ``t`` is finite;
    with ``rows`` (int64 indices into dim 0), only those rows are checked. Nothing is cached: every
    call reads the values it checks."""
    if t.numel() == 0 or (_sum_finite(t) if rows is None else rows.numel() == 0 or _rows_finite(t, rows)):
        return
    bad = _first_nonfinite(t if rows is None else t.index_select(0, rows))  # one exact read
    if bad is None:  # finite values whose sum overflowed
        return
    if rows is not None:
        bad[0] = int(rows[bad[0]])
    raise ValueError(f"{name} contains non-finite values (first at index {bad})")


def overflow_message(name: str, out_dtype: torch.dtype) -> str:
    """What the contract says of an output (``name``: dla, dots or norms) with a NaN or an infinity
    although every input is finite: the accumulation dtype ``out_dtype`` overflowed."""
    return (f"the attribution overflowed {str(out_dtype).replace('torch.', '')}: {name} has non-finite "
            "values although every input is finite")


def output_overflow(name: str, out_dtype: torch.dtype, *inputs: torch.Tensor) -> ValueError:
    """The contract's error for an overflowed output (`overflow_message`), with the largest magnitude of
    the ``inputs`` (z, W_O, extra_nodes) and what to do."""
    biggest = max(float(x.abs().max()) for x in inputs if x.numel())
    return ValueError(f"{overflow_message(name, out_dtype)} (inputs up to {biggest:.3g} in magnitude); "
                      "scale the inputs down, or use float64")


def used_rows(n_rows: int, *ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The distinct rows >= 0, in increasing order, that gathered ids in [-1, n_rows) read (-1 = no
    target reads nothing): marks in a table of n_rows flags, a pass over the ids and one over the
    flags, where sorting the ids (torch.unique) took 0.8 ms for 8,192 of them with cold caches."""
    mark = torch.zeros(n_rows, dtype=torch.bool, device=ids[0].device)
    for i in ids:
        if i is not None:
            mark[i[i >= 0]] = True
    return mark.nonzero().reshape(-1)


def require_finite_inputs(z: torch.Tensor, W_O: torch.Tensor, extra_nodes: torch.Tensor, directions: torch.Tensor,
                          direction_ids: Optional[torch.Tensor] = None,
                          incorrect_ids: Optional[torch.Tensor] = None) -> None:
    """`require_finite` of the contract's inputs in its order: z, W_O, extra_nodes, then directions --
    every row in fixed-set mode (``direction_ids`` None), else the rows the ids read (`used_rows`;
    W_U.T has 25M values). The error names the first input with a bad value and its first bad index."""
    require_finite("z", z)
    require_finite("W_O", W_O)
    require_finite("extra_nodes", extra_nodes)
    require_finite("directions", directions,
                   None if direction_ids is None else used_rows(directions.shape[0], direction_ids, incorrect_ids))
