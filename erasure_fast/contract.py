"""The one contract of the fused attribution operation, shared by every backend.

This module is the single place where inputs are validated and a backend is chosen. Backends
(`erasure_fast.backends.*`) receive tensors that already satisfy every rule below and implement the
math, nothing more. The definitions: docs/math.md (in the repository).

Shapes (T tokens, N heads layer-major, M extra nodes, W writers, K directions, H = d_head, D = d_model)::

    z             [T, N, H]   per-head attention outputs (TransformerLens ``hook_z``), flattened over
                              batch and position
    W_O           [N, H, D]   output weights per head, same order as z
    directions    [K, D]      direction table. Two modes:
                              * fixed set (``direction_ids is None``): DLA against all K rows,
                                ``dla`` is [T, N, K];
                              * gathered (``direction_ids`` [T] given): token t uses row
                                ``direction_ids[t]`` (minus row ``incorrect_ids[t]`` when given),
                                ``dla`` is [T, N]. Id -1 means "no target here": that row of ``dla``
                                is NaN. Per-token directions [T, D] are the gathered mode with
                                ``direction_ids = arange(T)``; next-token DLA is ``directions = W_U.T``.
    scale         [T]         final-LayerNorm scale s[t] (> 0, finite)
    writers       [W]         indices into the N heads whose outputs are the erasure references
    extra_nodes   [T, M, D]   optional further node vectors (MLP outputs, embeddings), or None

Outputs (float64 when z is float64, else float32; fp32 accumulation for bf16/fp16 inputs)::

    dla    [T, N] or [T, N, K]  ( r_n[t] . c(d[t]) ) / s[t],  r_n = z_n W_O[n], c = centring when
                                ``center`` (LayerNorm models), identity otherwise (RMSNorm)
    dots   [T, N + M, W]        node . r_w  for every node (heads, then extra nodes) and writer
    norms  [T, N + M]           |node|^2 (None when ``with_norms=False``: DLA-only callers skip the
                                cost, which would otherwise dominate the head-space DLA paths)

Projection ratio, projection value and cosine follow (`derive_measures`). NaN policy: where a
writer's squared norm is 0, its PR / PV / cosine are NaN in every backend; non-finite inputs are
rejected (``check_finite``) rather than propagated silently: z, W_O and extra_nodes entirely,
directions in the rows the call reads. Every check runs before any work, except that of z and
extra_nodes on the cpp backend: its kernels check each value as they read it (one read of the
activations instead of two; W_O and the directions are read before the kernel starts) and raise the
same error, naming the first bad index, before any output is returned (`run_backend`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .backends import get_backend
from .backends.base import FusedInputs, FusedOutputs, accumulation_dtype  # noqa: F401 (the contract's types)
from .deferred_checks import DeferredChecks
from .finite import (all_finite, output_overflow, overflow_message, require_finite,  # noqa: F401 (re-exported:
                     require_finite_inputs)  # the contract's checks)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32, float64, bfloat16 or float16, got {t.dtype}"
        )


def _as_ids(name: str, value, n_tokens: int, n_rows: int, device: torch.device,
            deferred: Optional[DeferredChecks] = None) -> torch.Tensor:
    ids = torch.as_tensor(value, device=device) if not isinstance(value, torch.Tensor) else value
    if ids.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but z is on {device}; put all inputs on one device")
    if ids.shape != (n_tokens,):
        raise ValueError(f"{name} must have shape [T]=[{n_tokens}], got {_shape(ids)}")
    ids = ids.to(torch.int64).contiguous()
    if deferred is not None:
        deferred.add(((ids >= -1) & (ids < n_rows)).all(), f"{name} must lie in [-1, {n_rows}) (-1 = no target; "
                                                           f"{n_rows} direction rows)")
    elif ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= n_rows:
            raise ValueError(
                f"{name} must lie in [-1, {n_rows}) (-1 = no target; {n_rows} direction rows), "
                f"got values in [{lo}, {hi}]"
            )
    return ids


def validate(
    z,
    W_O,
    directions,
    scale,
    writers,
    extra_nodes=None,
    *,
    direction_ids=None,
    incorrect_ids=None,
    center: bool = True,
    check_finite: bool = True,
    with_norms: bool = True,
    dla_table=None,
    distinct_writers: bool = False,
    deferred: Optional[DeferredChecks] = None,
    checks_in_run: bool = False,
) -> FusedInputs:
    """Check every argument of `fused_attribution` and return backend-ready `FusedInputs`.

    Raises TypeError (wrong kind or dtype) or ValueError (shape, range, device, non-finite) naming
    the argument, the expected value and what was received. Nothing reaches a backend before this.
    Backends take a head as writer more than once (each occurrence its own column of ``dots``);
    ``distinct_writers`` refuses that, as the public `fused_attribution` and `attribute` do.
    With ``deferred`` (`DeferredChecks`), the checks of values that differ from call to call -- z and
    extra_nodes finite, scale finite and positive, ids in range -- are recorded there instead of read
    (nothing waits for a GPU); W_O and directions, the same in every call of such a caller, are not
    checked here: the caller checks them once (a scan does, before its first batch).
    With ``checks_in_run`` (and no ``deferred``), the finiteness of the inputs (z, W_O, extra_nodes and
    the rows of directions the call reads) and that of the outputs (`require_finite_outputs`) are left
    to `run_backend`, which has a backend that `checks_inputs` / `checks_outputs` do them in its own
    code -- the cpp backend reads the weights before its kernel starts, the activations as the kernel
    reads them and the outputs as it writes them: no second read of the activations or the outputs,
    and the same errors, raised before any output is returned -- and checks them itself for any other
    backend. Everything else is still checked here, before any work.
    """
    z = _require_tensor("z", z)
    W_O = _require_tensor("W_O", W_O)
    directions = _require_tensor("directions", directions)
    scale = _require_tensor("scale", scale)
    _require_float("z", z)
    if z.ndim != 3:
        raise ValueError(f"z must have shape [T, N, d_head], got {_shape(z)}")
    T, N, H = z.shape
    if T == 0:
        raise ValueError("z has no tokens (T = 0); pass at least one token")
    if N == 0 or H == 0:
        raise ValueError(f"z must have at least one head and d_head >= 1, got {_shape(z)}")
    device = z.device
    dtype = z.dtype

    def same_kind(name: str, t: torch.Tensor) -> None:
        _require_float(name, t)
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but z is on {device}; put all inputs on one device")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but z has {dtype}; use one dtype for z, W_O, directions and extra_nodes")

    same_kind("W_O", W_O)
    if W_O.ndim != 3 or W_O.shape[0] != N or W_O.shape[1] != H:
        raise ValueError(f"W_O must have shape [N, d_head, d_model]=[{N}, {H}, d_model], got {_shape(W_O)}")
    D = W_O.shape[2]
    if D == 0:
        raise ValueError("W_O has d_model = 0")
    same_kind("directions", directions)
    if directions.ndim != 2 or directions.shape[1] != D:
        raise ValueError(f"directions must have shape [K, d_model]=[K, {D}], got {_shape(directions)}")
    K = directions.shape[0]
    if K == 0:
        raise ValueError("directions has no rows (K = 0)")

    _require_float("scale", scale)
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but z is on {device}; put all inputs on one device")
    if scale.ndim == 2 and scale.shape[1] == 1:  # TransformerLens keeps a trailing singleton dim
        scale = scale[:, 0]
    if scale.shape != (T,):
        raise ValueError(f"scale must have shape [T]=[{T}], got {_shape(scale)}")
    acc = accumulation_dtype(dtype)
    scale = scale.to(acc).contiguous()
    scale_message = "scale must be finite and > 0 at every token (it divides the DLA)"
    if deferred is not None:
        deferred.add((torch.isfinite(scale) & (scale > 0)).all(), scale_message)
    elif not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(scale_message)

    if isinstance(writers, torch.Tensor):
        w = writers
        if w.dtype not in _INT_DTYPES:
            raise TypeError(f"writers must be integer head indices, got dtype {w.dtype}")
        w = w.to(device="cpu", dtype=torch.int64).reshape(-1)
    else:
        try:
            w = torch.as_tensor(list(writers), dtype=torch.int64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"writers must be a sequence of int head indices, got {writers!r}") from e
        w = w.reshape(-1)
    if w.numel() and (int(w.min()) < 0 or int(w.max()) >= N):
        raise ValueError(f"writers must be head indices in [0, {N}), got {w.tolist()}")
    if distinct_writers:
        values, counts = torch.unique(w, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"writers names head {int(values[counts > 1][0])} more than once ({w.tolist()}); list each "
                             "head once")
    w_host, w = w, w.to(device)

    if extra_nodes is None:
        extra = z.new_zeros((T, 0, D))
    else:
        extra = _require_tensor("extra_nodes", extra_nodes)
        same_kind("extra_nodes", extra)
        if extra.ndim != 3 or extra.shape[0] != T or extra.shape[2] != D:
            raise ValueError(f"extra_nodes must have shape [T, M, d_model]=[{T}, M, {D}], got {_shape(extra)}")

    ids = inc = None
    if direction_ids is not None:
        ids = _as_ids("direction_ids", direction_ids, T, K, device, deferred)
    if incorrect_ids is not None:
        if ids is None:
            raise ValueError("incorrect_ids needs direction_ids (logit difference is a gathered-mode option)")
        inc = _as_ids("incorrect_ids", incorrect_ids, T, K, device, deferred)

    if dla_table is not None:
        _check_dla_table(dla_table, W_O, directions, center, ids, w, extra)

    if check_finite and deferred is not None:
        for name, t in (("z", z), ("extra_nodes", extra)):
            deferred.add(torch.isfinite(t).all(), f"{name} contains non-finite values")
    elif check_finite and not checks_in_run:
        require_finite_inputs(z, W_O, extra, directions, ids, inc)

    return FusedInputs(
        z=z.contiguous(),
        W_O=W_O.contiguous(),
        directions=directions.contiguous(),
        scale=scale,
        writers=w,
        extra_nodes=extra.contiguous(),
        direction_ids=ids,
        incorrect_ids=inc,
        center=bool(center),
        with_norms=bool(with_norms),
        dla_table=dla_table,
        writers_host=w_host,
        check_inputs=check_finite and checks_in_run and deferred is None,
        check_outputs=check_finite and checks_in_run and deferred is None,
    )


def run_backend(impl, inputs: FusedInputs) -> FusedOutputs:
    """``impl.run(inputs)`` (``impl`` a `erasure_fast.backends.base.Backend`). Where ``inputs`` still
    need their NaN / infinity checks (`validate`'s ``checks_in_run``), a backend that `checks_inputs`
    does them itself (the cpp backend: the weights before its kernel starts, z and extra_nodes as the
    kernel reads them); for any other they are done here first (`require_finite_inputs`). Likewise the
    outputs (`require_finite_outputs`): checked as the kernels write them, or here after the run."""
    if inputs.check_inputs and not impl.checks_inputs:
        require_finite_inputs(inputs.z, inputs.W_O, inputs.extra_nodes, inputs.directions, inputs.direction_ids,
                              inputs.incorrect_ids)
        inputs = dataclasses.replace(inputs, check_inputs=False)
    check_here = inputs.check_outputs and not impl.checks_outputs
    if check_here:
        inputs = dataclasses.replace(inputs, check_outputs=False)
    out = impl.run(inputs)
    if check_here:
        require_finite_outputs(inputs, out)
    return out


def require_finite_outputs(inputs: FusedInputs, out: FusedOutputs, deferred: Optional[DeferredChecks] = None) -> None:
    """ValueError unless every output that finite inputs define is finite -- DLA where a target (and a
    wrong target, for a logit difference) exists (NaN marks "no target"), every dot and norm: values too large for the accumulation dtype (float32
    overflows near 3.4e38, and a norm squares the head outputs) would otherwise come back as inf and
    NaN without a word. With ``deferred``, the outcome is recorded there instead of read (`validate`)."""
    dla = out.dla
    if inputs.direction_ids is not None:  # tokens with a target (and a wrong one, for a logit difference)
        has_target = inputs.direction_ids >= 0
        if inputs.incorrect_ids is not None:
            has_target &= inputs.incorrect_ids >= 0
        if deferred is None:
            dla = dla.index_select(0, torch.nonzero(has_target).reshape(-1))
        else:  # no output sized by the data: the rows without a target count as finite
            dla = torch.where(has_target.reshape(-1, *([1] * (dla.dim() - 1))), dla,
                              torch.zeros((), dtype=dla.dtype, device=dla.device))
    for name, t in (("dla", dla), ("dots", out.dots), ("norms", out.norms)):
        if t is None or not t.numel():
            continue
        if deferred is not None:
            deferred.add(torch.isfinite(t).all(),
                         f"{overflow_message(name, inputs.out_dtype)}; scale the inputs down, or use float64")
        elif not all_finite(t):
            raise output_overflow(name, inputs.out_dtype, inputs.z, inputs.W_O, inputs.extra_nodes)


def _check_dla_table(table, W_O, directions, center, ids, writers, extra) -> None:
    """A DLA table serves gathered DLA-only requests on the very tensors it was built from."""
    if not callable(getattr(table, "matches", None)) or not hasattr(table, "table"):
        raise TypeError(f"dla_table must be an erasure_fast.DlaTable (from build_dla_table), got {type(table).__name__}")
    if ids is None or writers.numel() or extra.shape[1]:
        raise ValueError("dla_table serves gathered DLA-only calls: pass direction_ids, no writers and no extra_nodes")
    if W_O.device.type != "cpu":
        raise ValueError(f"dla_table is a CPU table (cpp backend), but the inputs are on {W_O.device}")
    if not table.matches(W_O, directions, center):
        raise ValueError(
            "dla_table was not built from these W_O / directions tensors with this center (or they were "
            "modified in place since); pass the same tensor objects, or build a new table"
        )


def fused_attribution(
    z: torch.Tensor,
    W_O: torch.Tensor,
    directions: torch.Tensor,
    scale: torch.Tensor,
    writers: Union[Sequence[int], torch.Tensor],
    extra_nodes: Optional[torch.Tensor] = None,
    *,
    direction_ids: Optional[torch.Tensor] = None,
    incorrect_ids: Optional[torch.Tensor] = None,
    center: bool = True,
    backend: str = "auto",
    check_finite: bool = True,
    with_norms: bool = True,
    dla_table=None,
) -> FusedOutputs:
    """Fused DLA + erasure dot products for raw tensors (any model: nnsight, custom, ...).

    Args:
        z: [T, N, d_head] per-head attention outputs (layer-major heads, batch x pos flattened).
        W_O: [N, d_head, d_model].
        directions: [K, d_model] direction table (fixed set, or rows gathered by ``direction_ids``).
        scale: [T] (or [T, 1]) final-LN scale, finite and > 0.
        writers: [W] distinct head indices in [0, N).
        extra_nodes: [T, M, d_model] further nodes (MLP outputs, embeddings) or None.
        direction_ids: [T] int, row of ``directions`` per token, -1 for none; None = fixed-set mode.
        incorrect_ids: [T] int, subtracted row per token (logit difference); needs direction_ids.
        center: centre the direction (LayerNorm models); False for RMSNorm.
        backend: "auto", "torch", "cpp" or "triton" (see `erasure_fast.available_backends()`).
        check_finite: reject non-finite z / W_O / extra_nodes and non-finite rows of directions that
            the call reads (every row in fixed-set mode, the rows named by the ids when gathered).
            The cpp backend checks z and extra_nodes in its kernels as it reads them (the same
            error, raised before anything is returned); every other check comes before any work.
        with_norms: False skips the squared norms (``norms`` is then None) -- for DLA-only calls.
        dla_table: a `DlaTable` built from these very W_O / directions tensors with this ``center``
            (`erasure_fast.build_dla_table`): gathered DLA-only calls on the cpp backend gather from
            it instead of reducing their targets each call. Other backends ignore it (same results).

    Returns:
        FusedOutputs(dla [T, N] or [T, N, K], dots [T, N+M, W], norms [T, N+M] or None).
    """
    inputs = validate(
        z, W_O, directions, scale, writers, extra_nodes,
        direction_ids=direction_ids, incorrect_ids=incorrect_ids,
        center=center, check_finite=check_finite, with_norms=with_norms, dla_table=dla_table, distinct_writers=True,
        checks_in_run=True,
    )
    return run_backend(get_backend(backend, inputs.z.device, inputs.z.dtype), inputs)


class Measures(NamedTuple):
    """Erasure measures of every node onto every writer, [..., n_nodes, W] each."""

    pr: torch.Tensor  # projection ratio (a.w)/(w.w)
    pv: torch.Tensor  # projection value (a.w)/|w|
    cos: torch.Tensor  # cosine (a.w)/(|a||w|)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with NaN wherever den == 0 (the math page's NaN policy)."""
    zero = den == 0
    out = num / torch.where(zero, torch.ones_like(den), den)
    return out.masked_fill(zero.expand_as(out), float("nan"))


def writer_sq_norms(norms: torch.Tensor, writers: torch.Tensor) -> torch.Tensor:
    """[..., 1, W] squared norms of the writers, broadcastable against dots [..., n_nodes, W]."""
    return norms.index_select(-1, writers.to(norms.device)).unsqueeze(-2)


def projection_ratio(dots: torch.Tensor, norms: torch.Tensor, writers: torch.Tensor) -> torch.Tensor:
    """PR = (a.w)/(w.w): dots [..., n_nodes, W], norms [..., n_nodes], writers [W] node indices."""
    return safe_div(dots, writer_sq_norms(norms, writers))


def projection_value(dots: torch.Tensor, norms: torch.Tensor, writers: torch.Tensor) -> torch.Tensor:
    """PV = (a.w)/|w| (shapes as `projection_ratio`; NaN where |w| = 0)."""
    return safe_div(dots, writer_sq_norms(norms, writers).sqrt())


def cosine(dots: torch.Tensor, norms: torch.Tensor, writers: torch.Tensor) -> torch.Tensor:
    """cos = (a.w)/(|a||w|) (shapes as `projection_ratio`; NaN where |a| or |w| = 0)."""
    return safe_div(dots, norms.unsqueeze(-1).sqrt() * writer_sq_norms(norms, writers).sqrt())


def derive_measures(dots: torch.Tensor, norms: torch.Tensor, writers: torch.Tensor) -> Measures:
    """PR, PV and cosine from the contract's outputs.

    Args:
        dots: [..., n_nodes, W]; norms: [..., n_nodes] (squared); writers: [W] node indices of the
        writers (heads come first, so a head index is its node index).
    Returns NaN where a writer's squared norm is 0 (and cosine also where the node's norm is 0).
    """
    return Measures(
        pr=projection_ratio(dots, norms, writers),
        pv=projection_value(dots, norms, writers),
        cos=cosine(dots, norms, writers),
    )
