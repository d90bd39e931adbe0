r"""Fused DLA + erasure dot products in one pass over z (Triton).

Math (see ``docs/math.md`` and ``erasure_fast/contract.py``)
=====================================================================
Per token t, head n, writer w, extra node m (T tokens, N heads, H = d_head, D = d_model)::

    r_n[t]       = z[t, n, :] @ W_O[n]                      (formed on chip, chunk of BLOCK_D at a time)
    dla[t, n]    = r_n[t] . c(d_t) / s[t]                   (gathered mode; c = centring if CENTER)
    dots[t, a, w]= node_a[t] . r_{writers[w]}[t]            (nodes = the N heads, then the M extras)
    norms[t, a]  = |node_a[t]|^2

``c(d) = d - mean_D(d)``; the per-token mean of the (gathered, minus incorrect) direction row is taken
in a first cheap pass over D (2 row reads per token, no table-wide statistics), so the main pass
dots with the already-centred chunk (no ``R.d - mu * sum(R)`` cancellation).

Fixed-direction mode (``direction_ids is None``) is not done here: ``dla[t, n, k]`` is cheaper in
head space, ``z[t, n] . (W_O[n] c(d_k))`` = 2*N*H*K FLOP/token instead of 2*N*D*K (D/H = 8x less for
GELU-4L), so the launcher calls ``dla_table.dla_fixed`` for it and this kernel only forms dots/norms.

Cost per token, GELU-4L shape (N = 32 heads, H = 64, D = 512, M = 4 extras, W = 32 writers = all heads)
-------------------------------------------------------------------------------------------------
FLOP (multiply-add = 2):
  * projections r_n          2*N*H*D        = 2.10 MFLOP
  * head x head Gram          2*N*N*D        = 1.05 MFLOP  (dots of heads with every head; the W
                                                            writer columns are selected at the end)
  * extras x heads            2*M_P*N*D      = 0.52 MFLOP  (M = 4 padded to the mma minimum 16; 0.13 useful)
  * norms, gathered DLA       4*(N+M)*D      = 0.07 MFLOP
  total ~ 3.7 MFLOP/token (3.3 useful). Nothing per head in d_model ever reaches global memory.
Bytes (fp32 inputs; halve z/W_O/extras for bf16/fp16):
  * compulsory HBM traffic: z 8 KiB + extras 8 KiB + 2 direction rows 4 KiB (+ a second read of the
    rows for the centring pass, L2-resident) + outputs (dots 4.5 KiB, norms 144 B, dla 128 B)
    ~ 25 KiB/token -> ~150 FLOP/B: compute-bound on an H200 (fp32 FMA ~67 TFLOP/s, ~4.8 TB/s).
  * W_O (4 MiB fp32) is re-read from L2 by every token tile: 4 MiB / BLOCK_T per token (256 KiB at
    BLOCK_T = 16), i.e. ~13 FLOP per L2 byte: BLOCK_T trades this against registers (below).
  * the z tile is re-read from L1/L2 once per BLOCK_D chunk (D/BLOCK_D times).
The alternative of writing every r to memory is 64 KiB/token each way (the math page's 8x).

Tiling and why
--------------
One program = BLOCK_T tokens x one block of nodes x one block of writers (grid axes 0, 1, 2).
For GELU-4L there is one node block (all 32 heads) and one writer block, and the writers are taken
from the heads' own on-chip outputs (``GRAM``): no projection is computed twice.
Loop over d_model in chunks of BLOCK_D:
  * R[n, t, :] = z[t, n, :] @ W_O[n, :, chunk]: a batched tl.dot [NB_P, BLOCK_T, BLOCK_H] @
    [NB_P, BLOCK_H, BLOCK_D], with an inner loop over d_head in BLOCK_H pieces so the operands of the
    dot (the part that is staged through shared memory) stay small: NB_P*(BLOCK_T+BLOCK_D)*BLOCK_H
    elements (32*(16+32)*32*4 B = 192 KiB fp32 / 96 KiB bf16 at BLOCK_H = 32; BLOCK_H = 16 halves it).
  * norms += sum R^2, dla += R . c(d_t)chunk (elementwise + reduction, exact fp32),
  * dots: a batched tl.dot over tokens [BLOCK_T, NB_P, BLOCK_D] @ [BLOCK_T, BLOCK_D, WB_P], with
    the writer operand being R itself (GRAM) or the writers' R recomputed from z[:, writers] and
    W_O[writers] gathered by index arithmetic (RECOMPUTE), and the same for the extras chunk.
Registers: the dots accumulator [BLOCK_T, NB_P, WB_P] (16*32*32 fp32 = 64 KiB per program, 64 regs
per thread at 8 warps) plus the R chunk (NB_P*BLOCK_T*BLOCK_D = 16K fp32 at 16x32) dominate; that is
why BLOCK_T stays at 16 (the autotune configs, `_GPU_CONFIGS`) and why nodes and writers are blocked
for large N.
Choice GRAM vs RECOMPUTE (launcher, per token per d_model element, padded sizes):
    GRAM:      N_P*N_P + M_P*N_P                  (Gram against all heads, select W columns at end)
    RECOMPUTE: W_P*H_P + N_P*W_P + M_P*W_P        (extra writer projections)
With the mma minimum of 16 rows, GRAM wins for every W at GELU-4L size (1536 vs >= 1792).
Large N (N_P > 64) or large W (W_P > 64) cannot keep one accumulator on chip: the grid is then split
into node blocks of 32 heads and writer blocks of 32 writers, RECOMPUTE; the recomputation costs
2*H*D*(N*(#writer blocks - 1) + W*#node blocks) FLOP/token on top of the 2*N*H*D projections.
The dla / norms of a node block are stored by the writer-block-0 program only; the extras are handled
by node-block-0 programs.

Precision: all accumulation in fp32. fp32 inputs use ``input_precision="ieee"`` (exact fp32 FMA) unless
``allow_tf32=True`` (tensor cores, ~1e-3 relative error). bf16/fp16 inputs feed the projection mma
natively (exact products, fp32 accumulation); every later dot is fp32. Under ``TRITON_INTERPRET=1``
bf16/fp16 operands are upcast to fp32 before the dot (the interpreter's dot cannot multiply bf16),
which gives the same numbers up to summation order. float64 is not supported (use the torch or cpp
backend); the launcher raises ValueError.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import p2 as _p2, sum_combine as _sum_combine

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Largest node / writer block kept on chip in one program (padded, powers of two).
MAX_BLOCK = 64
SPLIT_BLOCK = 32


@triton.jit
def _fused_attribution_kernel(
    z_ptr, wo_ptr, dir_ptr, ids_ptr, inc_ptr, scale_ptr, wr_ptr, ex_ptr,
    dla_ptr, dots_ptr, norms_ptr,
    T, N, H, D, M, W,
    NB_P: tl.constexpr,  # heads per node block (padded)
    WB_P: tl.constexpr,  # writers per writer block (padded); in GRAM mode the padded W
    M_P: tl.constexpr,  # extras (padded)
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    GATHERED: tl.constexpr,  # dla for one gathered direction per token (else no dla here)
    HAS_INCORRECT: tl.constexpr,  # subtract the incorrect row (logit difference)
    CENTER: tl.constexpr,  # centre the direction over d_model
    HAS_EXTRA: tl.constexpr,  # M > 0
    GRAM: tl.constexpr,  # writers are read from the node block's own R (one node block holding all heads)
    WR_IDENTITY: tl.constexpr,  # GRAM and writers == arange(N): no column selection
    UPCAST: tl.constexpr,  # convert z / W_O to fp32 before the projection dot
    DOT_PREC: tl.constexpr,  # "ieee" or "tf32" for fp32 dots
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_w = tl.program_id(2)
    NODES = N + M

    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T*N*H may pass 2^31
    t_ok = offs_t < T
    offs_n = pid_n * NB_P + tl.arange(0, NB_P)  # head indices of this node block
    n_ok = offs_n < N
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, M_P)
    offs_wl = tl.arange(0, WB_P)  # local writer slot
    offs_w = pid_w * WB_P + offs_wl  # writer slot in [0, W)
    w_ok = offs_w < W

    # [NB_P, BLOCK_T, 1] / [NB_P, 1, 1] bases for the projection operands
    z_rows = z_ptr + offs_t[None, :, None] * (N * H) + offs_n[:, None, None] * H
    z_ok = n_ok[:, None, None] & t_ok[None, :, None]
    wo_rows = wo_ptr + offs_n[:, None, None] * (H * D)
    if not GRAM:
        wr = tl.load(wr_ptr + offs_w, mask=w_ok, other=0)
        zw_rows = z_ptr + offs_t[None, :, None] * (N * H) + wr[:, None, None] * H
        zw_ok = w_ok[:, None, None] & t_ok[None, :, None]
        wow_rows = wo_ptr + wr[:, None, None] * (H * D)
    if HAS_EXTRA:
        # extras belong to node block 0 (the "extras rows" of the dots tile)
        ex_rows = ex_ptr + offs_t[:, None, None] * (M * D) + offs_m[None, :, None] * D
        m_here = M - M * tl.minimum(pid_n, 1)  # M in node block 0, else 0 (pure int: no scalar masks)
        me_ok = offs_m < m_here
        ex_ok = t_ok[:, None, None] & me_ok[None, :, None]

    if GATHERED:
        ids = tl.load(ids_ptr + offs_t, mask=t_ok, other=-1)
        valid = ids >= 0
        d_rows = dir_ptr + tl.maximum(ids, 0) * D
        if HAS_INCORRECT:
            inc = tl.load(inc_ptr + offs_t, mask=t_ok, other=-1)
            valid = valid & (inc >= 0)
            i_rows = dir_ptr + tl.maximum(inc, 0) * D
        if CENTER:  # pass 1: mean of the token's direction row over d_model
            mu = tl.full([BLOCK_T], 0.0, tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                m2 = t_ok[:, None] & (dd < D)[None, :]
                v = tl.load(d_rows[:, None] + dd[None, :], mask=m2, other=0.0).to(tl.float32)
                if HAS_INCORRECT:
                    v -= tl.load(i_rows[:, None] + dd[None, :], mask=m2, other=0.0).to(tl.float32)
                mu += tl.reduce(v, 1, _sum_combine)
            mu = mu / D
        dla_acc = tl.full([NB_P, BLOCK_T], 0.0, tl.float32)

    nrm = tl.full([NB_P, BLOCK_T], 0.0, tl.float32)
    if GRAM:  # node . every head of the (single) node block; writer columns picked at the end
        acc = tl.full([BLOCK_T, NB_P, NB_P], 0.0, tl.float32)
        if HAS_EXTRA:
            acc_e = tl.full([BLOCK_T, M_P, NB_P], 0.0, tl.float32)
    else:
        acc = tl.full([BLOCK_T, NB_P, WB_P], 0.0, tl.float32)
        if HAS_EXTRA:
            acc_e = tl.full([BLOCK_T, M_P, WB_P], 0.0, tl.float32)
    if HAS_EXTRA:
        nrm_e = tl.full([BLOCK_T, M_P], 0.0, tl.float32)

    # pass 2: d_model in chunks; every head's output chunk lives only here
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        R = tl.full([NB_P, BLOCK_T, BLOCK_D], 0.0, tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + offs_h
            h_ok = hh < H
            zt = tl.load(z_rows + hh[None, None, :], mask=z_ok & h_ok[None, None, :], other=0.0)
            wo = tl.load(wo_rows + hh[None, :, None] * D + dd[None, None, :],
                         mask=n_ok[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :], other=0.0)
            if UPCAST:
                R = tl.dot(zt.to(tl.float32), wo.to(tl.float32), R, input_precision=DOT_PREC)
            else:
                R = tl.dot(zt, wo, R)
        nrm += tl.reduce(R * R, 2, _sum_combine)
        if GATHERED:
            m2 = t_ok[:, None] & d_ok[None, :]
            v = tl.load(d_rows[:, None] + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_INCORRECT:
                v -= tl.load(i_rows[:, None] + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            if CENTER:
                v = tl.where(m2, v - mu[:, None], 0.0)
            dla_acc += tl.reduce(R * v[None, :, :], 2, _sum_combine)

        Rt = tl.permute(R, (1, 0, 2))  # [BLOCK_T, NB_P, BLOCK_D]
        if GRAM:
            RwT = tl.permute(R, (1, 2, 0))  # [BLOCK_T, BLOCK_D, NB_P]
        else:
            Rw = tl.full([WB_P, BLOCK_T, BLOCK_D], 0.0, tl.float32)
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + offs_h
                h_ok = hh < H
                zw = tl.load(zw_rows + hh[None, None, :], mask=zw_ok & h_ok[None, None, :], other=0.0)
                wow = tl.load(wow_rows + hh[None, :, None] * D + dd[None, None, :],
                              mask=w_ok[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :], other=0.0)
                if UPCAST:
                    Rw = tl.dot(zw.to(tl.float32), wow.to(tl.float32), Rw, input_precision=DOT_PREC)
                else:
                    Rw = tl.dot(zw, wow, Rw)
            RwT = tl.permute(Rw, (1, 2, 0))  # [BLOCK_T, BLOCK_D, WB_P]
        acc = tl.dot(Rt, RwT, acc, input_precision=DOT_PREC)
        if HAS_EXTRA:
            E = tl.load(ex_rows + dd[None, None, :], mask=ex_ok & d_ok[None, None, :], other=0.0).to(tl.float32)
            nrm_e += tl.reduce(E * E, 2, _sum_combine)
            acc_e = tl.dot(E, RwT, acc_e, input_precision=DOT_PREC)

    # ---- stores ----
    n_store = N - N * tl.minimum(pid_w, 1)  # dla / norms stored by writer block 0 only
    nt_ok = (offs_n < n_store)[:, None] & t_ok[None, :]
    tl.store(norms_ptr + offs_t[None, :] * NODES + offs_n[:, None], nrm, mask=nt_ok)
    if GATHERED:
        s = tl.load(scale_ptr + offs_t, mask=t_ok, other=1.0)
        out = dla_acc / s[None, :]
        out = tl.where(valid[None, :], out, float("nan"))
        tl.store(dla_ptr + offs_t[None, :] * N + offs_n[:, None], out, mask=nt_ok)
    if HAS_EXTRA:
        tl.store(norms_ptr + offs_t[:, None] * NODES + N + offs_m[None, :], nrm_e,
                 mask=t_ok[:, None] & (offs_m < m_here - M * tl.minimum(pid_w, 1))[None, :])

    if GRAM and not WR_IDENTITY:
        # acc[t, a, j] holds node a . head j; pick column writers[w] for every writer slot w
        sel = tl.full([BLOCK_T, NB_P, WB_P], 0.0, tl.float32)
        if HAS_EXTRA:
            sel_e = tl.full([BLOCK_T, M_P, WB_P], 0.0, tl.float32)
        for w in range(0, W):
            j = tl.load(wr_ptr + w)
            pick = offs_n[None, None, :] == j
            slot = offs_wl[None, None, :] == w
            col = tl.reduce(tl.where(pick, acc, 0.0), 2, _sum_combine)
            sel = tl.where(slot, col[:, :, None], sel)
            if HAS_EXTRA:
                col_e = tl.reduce(tl.where(pick, acc_e, 0.0), 2, _sum_combine)
                sel_e = tl.where(slot, col_e[:, :, None], sel_e)
    else:
        sel = acc
        if HAS_EXTRA:
            sel_e = acc_e
    dots_rows = dots_ptr + offs_t[:, None, None] * (NODES * W)
    tl.store(dots_rows + offs_n[None, :, None] * W + offs_w[None, None, :], sel,
             mask=t_ok[:, None, None] & n_ok[None, :, None] & w_ok[None, None, :])
    if HAS_EXTRA:
        tl.store(dots_rows + (N + offs_m[None, :, None]) * W + offs_w[None, None, :], sel_e,
                 mask=t_ok[:, None, None] & me_ok[None, :, None] & w_ok[None, None, :])


# (BLOCK_T, BLOCK_D, BLOCK_H, num_warps, num_stages). Chosen from the offline sm_90 compile report
# (benchmarks/triton_compile_report.py -> benchmarks/results/triton-compile-sm90/, triton 3.6), not from
# GPU timings: at the GELU-4L shape every earlier config spilled 2.5-48 KB per thread (some fell back to
# 32 registers), three needed 256 KiB of shared memory (over sm_90's 227 KiB: they fail at launch), and
# each took 2.5-9 s to compile. These two spill least (<= 0.3 KB per thread, fp32 and bf16), use
# 64 KiB of shared memory and compile in ~1 s; 8 or 16 warps keep the [BLOCK_T, NB_P, NB_P] fp32
# accumulator (16*32*32) at 64 / 32 registers per thread.
_GPU_CONFIGS = [
    (16, 16, 16, 8, 1),
    (16, 16, 16, 16, 2),
]
_INTERPRET_CONFIG = dict(BLOCK_T=16, BLOCK_D=16, BLOCK_H=16)
_KEY = ["N", "H", "D", "M", "W", "NB_P", "WB_P", "M_P", "GATHERED", "HAS_INCORRECT", "CENTER",
        "HAS_EXTRA", "GRAM", "WR_IDENTITY", "UPCAST", "DOT_PREC"]

if INTERPRET:
    _kernel = _fused_attribution_kernel
else:  # pragma: no cover - needs a GPU
    _kernel = triton.autotune(
        configs=[triton.Config(dict(BLOCK_T=bt, BLOCK_D=bd, BLOCK_H=bh), num_warps=nw, num_stages=ns)
                 for bt, bd, bh, nw, ns in _GPU_CONFIGS],
        key=_KEY,
    )(_fused_attribution_kernel)


def plan(N: int, H: int, M: int, writers: torch.Tensor) -> dict:
    """Node/writer blocking and GRAM vs RECOMPUTE for these sizes (see the module docstring)."""
    return _plan(N, H, M, writers)


def _plan(N: int, H: int, M: int, writers: torch.Tensor, mode: Optional[str] = None,
          max_block: int = MAX_BLOCK) -> dict:
    """`plan` with the test seams: ``mode`` None (cost model), "gram" or "recompute" (tests force both
    paths); ``max_block`` the largest node / writer block held by one program (tests lower it to
    exercise the split grid)."""
    split = min(SPLIT_BLOCK, max_block)
    W = int(writers.numel())
    N_P, W_P, M_P = _p2(N), _p2(W), _p2(M)
    H_P = _p2(H)
    if N_P <= max_block:
        nb_p, n_blocks = N_P, 1
    else:
        nb_p, n_blocks = split, triton.cdiv(N, split)
    gram_ok = n_blocks == 1 and W_P <= max_block
    gram_cost = N_P * N_P + M_P * N_P
    rec_cost = W_P * H_P + N_P * W_P + M_P * W_P
    if mode is None:
        gram = gram_ok and gram_cost <= rec_cost
    elif mode == "gram":
        if not gram_ok:
            raise ValueError(f"GRAM mode needs N <= {max_block} heads and W <= {max_block} writers")
        gram = True
    elif mode == "recompute":
        gram = False
    else:
        raise ValueError(f"mode must be None, 'gram' or 'recompute', got {mode!r}")
    if gram:
        wb_p, w_blocks = W_P, 1
        identity = W == N and writers.tolist() == list(range(N))
    else:
        wb_p = W_P if W_P <= max_block else split
        w_blocks = triton.cdiv(W, wb_p)
        identity = False
    return dict(NB_P=nb_p, n_blocks=n_blocks, WB_P=wb_p, w_blocks=w_blocks, M_P=M_P, GRAM=gram,
                WR_IDENTITY=identity)


def fused_attribution(
    z: torch.Tensor,
    W_O: torch.Tensor,
    directions: torch.Tensor,
    scale: torch.Tensor,
    writers: torch.Tensor,
    extra_nodes: torch.Tensor,
    direction_ids: Optional[torch.Tensor],
    incorrect_ids: Optional[torch.Tensor],
    center: bool,
    *,
    allow_tf32: bool = False,
    writers_host: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Launch the fused kernel on contract-valid, contiguous tensors (W >= 1 writers); ``writers_host``,
    the writers on the host, spares the plan reading them back from the GPU.

    Returns (dla [T, N] float32 in gathered mode or None in fixed mode, dots [T, N+M, W], norms [T, N+M]).
    In fixed mode the caller computes dla with `dla_table.dla_fixed` (cheaper in head space).
    """
    return _launch(z, W_O, directions, scale, writers, extra_nodes, direction_ids, incorrect_ids, center,
                   allow_tf32=allow_tf32, writers_host=writers_host)


def _launch(z, W_O, directions, scale, writers, extra_nodes, direction_ids, incorrect_ids, center, *,
            allow_tf32: bool = False, mode: Optional[str] = None, block_sizes: Optional[dict] = None,
            max_block: int = MAX_BLOCK, writers_host: Optional[torch.Tensor] = None):
    """`fused_attribution` with the test seams: ``mode`` / ``max_block`` as in `_plan`; ``block_sizes``
    (BLOCK_T/BLOCK_D/BLOCK_H) overrides the interpreter config (on GPU autotune picks)."""
    if z.dtype == torch.float64:
        raise ValueError("the Triton kernels compute in float32; use backend='torch' or 'cpp' for float64 inputs")
    T, N, H = z.shape
    D = W_O.shape[2]
    M = extra_nodes.shape[1]
    W = int(writers.numel())
    if W == 0:
        raise ValueError("fused kernel needs at least one writer (DLA-only requests go to dla_table)")
    p = _plan(N, H, M, writers if writers_host is None else writers_host, mode, max_block)
    dev = z.device
    gathered = direction_ids is not None
    dla = torch.empty((T, N), dtype=torch.float32, device=dev) if gathered else None
    dots = torch.empty((T, N + M, W), dtype=torch.float32, device=dev)
    norms = torch.empty((T, N + M), dtype=torch.float32, device=dev)
    ids = direction_ids if gathered else writers  # dummy pointer when unused
    inc = incorrect_ids if incorrect_ids is not None else ids
    ex = extra_nodes if M else z
    args = (z, W_O, directions, ids, inc, scale, writers, ex, dla if gathered else norms, dots, norms,
            T, N, H, D, M, W)
    meta = dict(
        NB_P=p["NB_P"], WB_P=p["WB_P"], M_P=p["M_P"],
        GATHERED=gathered, HAS_INCORRECT=incorrect_ids is not None, CENTER=bool(center) and gathered,
        HAS_EXTRA=M > 0, GRAM=p["GRAM"], WR_IDENTITY=p["WR_IDENTITY"],
        UPCAST=INTERPRET or z.dtype == torch.float32,
        DOT_PREC="tf32" if allow_tf32 else "ieee",
    )
    if INTERPRET or block_sizes is not None:
        bs = dict(_INTERPRET_CONFIG, **(block_sizes or {}))
        grid = (triton.cdiv(T, bs["BLOCK_T"]), p["n_blocks"], p["w_blocks"])
        kern = _fused_attribution_kernel
        kern[grid](*args, **meta, **bs)
    else:  # pragma: no cover - needs a GPU
        grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]), p["n_blocks"], p["w_blocks"])  # noqa: E731
        _kernel[grid](*args, **meta)
    return dla, dots, norms
