"""Head-space DLA tables for the C++ backend's gathered DLA-only path: A[k, n, :] = W_O[n] c(d_k).

A table is an explicit object: pass it to `erasure_fast.fused_attribution(..., dla_table=table)` (or
`logit_attrs_heads(..., dla_table=table)`); no call consults a table it was not given, so a call's
result and code path never depend on what ran before. The math: docs/math.md (r.c(d) = z.(W_O c(d))).

Typical use (next-token DLA over a long run, GELU-4L: 48,262 rows, 377 MiB when complete)::

    dirs = W_U.T.contiguous()                                  # keep one tensor, pass it every call
    table = build_dla_table(W_O, dirs, center=True, lazy=True)  # rows built as targets first appear
    out = fused_attribution(z, W_O, dirs, scale, [], direction_ids=ids, with_norms=False,
                            dla_table=table)
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..finite import require_finite
from .base import accumulation_dtype
from .cpp import dtype_suffix, get_num_threads, kernel_array, require_extension


class _TensorKey(NamedTuple):
    ptr: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    version: int

    @staticmethod
    def of(t: torch.Tensor) -> "_TensorKey":
        return _TensorKey(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)


class DlaTable:
    """A[k, n, :] = W_O[n] @ c(directions[k]) for the rows k of directions, [K, N, d_head] in the
    accumulation dtype.

    Built by `build_dla_table`, complete (every row at once) or lazy (a row when a call first
    needs it: the first call costs what the per-call unique reduction costs, later calls only
    gather, and memory grows with the distinct targets seen). A lazy row has the same bits as the
    complete table's. Holds (strong) references to its W_O and directions tensors, so their
    storage cannot be reused while the table lives, and remembers their in-place version: a table
    whose W_O or directions were modified in place is never used.
    """

    def __init__(self, table: torch.Tensor, W_O: torch.Tensor, directions: torch.Tensor, center: bool,
                 filled: Optional[np.ndarray] = None):
        self.table = table
        self.center = bool(center)
        self._W_O = W_O
        self._directions = directions
        self._keys = (_TensorKey.of(W_O), _TensorKey.of(directions))
        self._filled = filled  # lazy: bool [K], rows built so far; None: complete
        self._fill_lock = threading.Lock()

    @property
    def W_O(self) -> torch.Tensor:
        """The W_O tensor the table was built from, [N, d_head, d_model]."""
        return self._W_O

    @property
    def directions(self) -> torch.Tensor:
        """The directions tensor the table was built from, [K, d_model]."""
        return self._directions

    @property
    def lazy(self) -> bool:
        return self._filled is not None

    @property
    def n_filled(self) -> int:
        """Rows built so far (K for a complete table)."""
        return self.shape[0] if self._filled is None else int(self._filled.sum())

    @property
    def filled_rows(self) -> torch.Tensor:
        """bool [K]: which rows are built (all True for a complete table); a copy."""
        K = self.shape[0]
        return torch.ones(K, dtype=torch.bool) if self._filled is None else torch.from_numpy(self._filled.copy())

    @property
    def nbytes(self) -> int:
        """Size of the table in bytes (K * N * d_head * itemsize); a lazy table reserves it but
        touches only its built rows (`filled_nbytes`)."""
        return self.table.numel() * self.table.element_size()

    @property
    def filled_nbytes(self) -> int:
        """Bytes of the rows built so far."""
        K = self.shape[0]
        return self.nbytes // max(K, 1) * self.n_filled

    @property
    def shape(self) -> tuple:
        return tuple(self.table.shape)

    def ensure_rows(self, *ids: Optional[torch.Tensor]) -> int:
        """Build the rows of a lazy table that `ids` (int tensors, -1 = none) need and it lacks;
        returns how many were built (0 for a complete table)."""
        if self._filled is None:
            return 0
        parts = [t.reshape(-1).to(torch.int64) for t in ids if t is not None]
        if not parts:
            return 0
        want = torch.cat(parts)
        want = torch.unique(want[want >= 0]).numpy()
        K = self.shape[0]
        if want.size and (want[-1] >= K):
            raise ValueError(f"ids must lie in [-1, {K}), got {int(want[-1])}")
        with self._fill_lock:
            missing = want[~self._filled[want]]
            if missing.size:
                _C = require_extension()
                dt = self._W_O.dtype
                getattr(_C, f"fill_dla_table_rows_{dtype_suffix(dt)}")(
                    kernel_array(self._W_O, dt), kernel_array(self._directions, dt), np.ascontiguousarray(missing),
                    self.table.numpy(), center=self.center, n_threads=get_num_threads())
                self._filled[missing] = True
        return int(missing.size)

    def is_current(self) -> bool:
        """False once W_O or directions has been modified in place since the build."""
        return self._keys == (_TensorKey.of(self._W_O), _TensorKey.of(self._directions))

    def matches(self, W_O: torch.Tensor, directions: torch.Tensor, center: bool) -> bool:
        """True when the table was built from these very tensors (same storage, layout, version)."""
        return (
            bool(center) == self.center
            and (_TensorKey.of(W_O), _TensorKey.of(directions)) == self._keys
            and self.is_current()
        )

    def __repr__(self) -> str:
        K, N, H = self.shape
        kind = f"lazy, {self.n_filled} of {K} rows built" if self.lazy else "complete"
        return (f"DlaTable(K={K}, N={N}, d_head={H}, dtype={self.table.dtype}, center={self.center}, "
                f"{kind}, {self.filled_nbytes / 2**20:.1f} of {self.nbytes / 2**20:.1f} MiB)")


def build_dla_table(W_O: torch.Tensor, directions: torch.Tensor, center: bool = True, *,
                    lazy: bool = False) -> DlaTable:
    """Build the gathered-DLA table A[k] = W_O c(directions[k]) for every row k (CPU), now or
    (``lazy=True``) row by row as calls need them.

    Args:
        W_O: [N, d_head, d_model]; directions: [K, d_model] (e.g. next-token DLA: ``W_U.T``; pass the
            same tensor object, or a view of the same storage with the same layout, to later calls).
            Tip: ``W_U.T`` is not contiguous and the contract makes a fresh contiguous copy per call,
            which never matches; keep ``dirs = W_U.T.contiguous()`` and use ``dirs`` everywhere.
        center: centre each direction (LayerNorm models), as in the calls that should use the table.
        lazy: build no row now; each call builds the rows of its new targets (at the cost of the
            per-call unique reduction) and gathers the rest. Best for long runs: no up-front
            build, and memory grows only with the distinct targets seen (`DlaTable.filled_nbytes`).
    Cost (complete): K * N * d_head * d_model FMAs once (GELU-4L, K = 48262: 0.7-1.1 s on the
    2-core machine); memory K * N * d_head * 4 bytes in fp32 (395 MB = 377 MiB for GELU-4L), see
    `DlaTable.nbytes`.
    """
    _C = require_extension()
    for name, t in (("W_O", W_O), ("directions", directions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"build_dla_table runs on cpu tensors, but {name} is on {t.device}")
        if t.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if W_O.dtype != directions.dtype:
        raise TypeError(f"W_O has dtype {W_O.dtype} but directions has {directions.dtype}")
    if W_O.dim() != 3 or directions.dim() != 2 or directions.shape[1] != W_O.shape[2]:
        raise ValueError(f"W_O must have shape [N, d_head, d_model] and directions [K, d_model], got "
                         f"{list(W_O.shape)} and {list(directions.shape)}")
    require_finite("W_O", W_O)
    if not lazy:  # a lazy table's rows are checked as calls gather them (the contract checks used rows)
        require_finite("directions", directions)
    dt = W_O.dtype
    if lazy:
        K, (N, H) = directions.shape[0], W_O.shape[:2]
        # untouched pages of the empty table are never resident: memory follows the rows built
        out = DlaTable(torch.empty((K, N, H), dtype=accumulation_dtype(dt)), W_O, directions, center,
                       filled=np.zeros(K, dtype=bool))
    else:
        fn = getattr(_C, f"build_dla_table_{dtype_suffix(dt)}")
        tab = fn(kernel_array(W_O, dt), kernel_array(directions, dt), center=bool(center), n_threads=get_num_threads())
        out = DlaTable(torch.from_numpy(tab), W_O, directions, center)
    return out
