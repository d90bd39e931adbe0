r"""DLA-only kernels in head space (Triton): no d_model vector per head is ever formed.

Math (``docs/math.md``: c(r).d = r.c(d) and r.v = z.(W_O v))
=======================================================================
    dla[t, n]    = z[t, n, :] . A[n, :]  / s[t],  A = W_O[n] c(d_t)        (gathered / next-token)
    dla[t, n, k] = z[t, n, :] . U[n, :, k] / s[t], U = W_O[n] c(d_k)       (fixed direction set)
    norms[t, n]  = |r_n[t]|^2 = z[t, n, :]^T  G[n]  z[t, n, :],  G[n] = W_O[n] W_O[n]^T  [H, H]

(a) Fixed set: U [N, H, K] = W_O c(directions)^T is one small matmul in the launcher
    (2*N*H*D*K FLOP per call); the kernel is then a per-head [BLOCK_T, H] @ [H, BLOCK_K] tl.dot.
(b) Gathered (next-token, logit difference): A is needed only for the direction rows that occur.
    The launcher takes the unique ids of the call (correct and incorrect), forms their head-space
    table A_u [K_u, N, H] = c(directions[u]) @ W_O^T in one matmul (2*K_u*N*H*D FLOP; memory
    K_u*N*H*4 B = 8 KiB per distinct id at GELU-4L, e.g. 160 MiB for 20k distinct tokens, freed after
    the call; never the whole 48262-row vocabulary = 377 MiB), and the kernel gathers A_u rows by the
    remapped ids: dla = z . (A[id] - A[inc]) / s, NaN where an id is -1. Centring is linear, so
    c(d_a - d_b) = c(d_a) - c(d_b) and the rows are centred once.
    No cache across calls: the table depends on W_O and the directions, and rebuilding it for the ids
    of a call costs less than the per-token pass whenever K_u << T is not true anyway (K_u <= T).
Head norms use the per-head Gram G (N*H*H floats, 512 KiB at GELU-4L): 2*N*H*H FLOP/token instead of
the 2*N*H*D of forming r (8x less at GELU-4L). Its rounding error is relative to |z|^2 ||G|| rather than
to |r|^2; it is exactly 0 for a head with W_O = 0 (so PR is NaN there, as in every backend).

Cost per token, GELU-4L (N = 32, H = 64, D = 512), gathered, fp32:
  * FLOP: dla 2*N*H = 4 K (+4 K for the incorrect row), norms 2*N*H*(H+1) = 0.27 M  -> 0.28 MFLOP
    (vs 2.1 MFLOP to form r) plus the per-call table 2*N*H*D = 2.1 MFLOP per *distinct* id.
  * bytes: z 8 KiB + A rows 8 KiB (16 KiB with an incorrect row; L2-resident for repeated ids)
    + dla/norms 256 B -> memory-bound (~17 FLOP/B): ~T * 16 KiB / 4.8 TB/s.
Fixed set (K directions): 2*N*H*K FLOP and 8 KiB + 4*N*K B per token.

Tiling: gathered/norms kernel: one program = BLOCK_T tokens x BLOCK_N heads with the whole d_head
(H_P <= 256) on chip; z tile [BLOCK_N, BLOCK_T, H_P]; norms via a batched tl.dot with G
[BLOCK_N, H_P, H_P] (the launcher uses BLOCK_N = 1: G[n] is 16 KiB at H = 64, and more heads per
program only spilled registers, see the launcher). Fixed kernel: grid
(token tiles, heads, K tiles), loop over d_head in BLOCK_H pieces, tl.dot into [BLOCK_T, BLOCK_K].
All accumulation fp32; ``allow_tf32`` (default False) lets the dots and the table matmuls use TF32.
float64 is rejected (use backend="torch" or "cpp").
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import p2 as _p2, sum_combine as _sum_combine

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dla_gathered_kernel(
    z_ptr, a_ptr, rid_ptr, irid_ptr, scale_ptr, g_ptr, dla_ptr, norms_ptr,
    T, N, H, NODES,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, H_P: tl.constexpr,
    WITH_DLA: tl.constexpr,  # gathered dla (else norms only, for the fixed-set path)
    HAS_INCORRECT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_h = tl.arange(0, H_P)
    h_ok = offs_h < H
    # z tile [BLOCK_N, BLOCK_T, H_P] in fp32
    zmask = n_ok[:, None, None] & t_ok[None, :, None] & h_ok[None, None, :]
    zt = tl.load(z_ptr + offs_t[None, :, None] * (N * H) + offs_n[:, None, None] * H + offs_h[None, None, :],
                 mask=zmask, other=0.0).to(tl.float32)
    # norms: (z G) . z per head, G[n] = W_O[n] W_O[n]^T
    g = tl.load(g_ptr + offs_n[:, None, None] * (H * H) + offs_h[None, :, None] * H + offs_h[None, None, :],
                mask=n_ok[:, None, None] & h_ok[None, :, None] & h_ok[None, None, :], other=0.0)
    q = tl.dot(zt, g, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_T, H_P]
    nrm = tl.reduce(q * zt, 2, _sum_combine)  # [BLOCK_N, BLOCK_T]
    out_ok = n_ok[:, None] & t_ok[None, :]
    tl.store(norms_ptr + offs_t[None, :] * NODES + offs_n[:, None], nrm, mask=out_ok)
    if WITH_DLA:
        rid = tl.load(rid_ptr + offs_t, mask=t_ok, other=-1)
        valid = rid >= 0
        a_rows = a_ptr + tl.maximum(rid, 0) * (N * H)
        a = tl.load(a_rows[None, :, None] + offs_n[:, None, None] * H + offs_h[None, None, :], mask=zmask, other=0.0)
        if HAS_INCORRECT:
            irid = tl.load(irid_ptr + offs_t, mask=t_ok, other=-1)
            valid = valid & (irid >= 0)
            i_rows = a_ptr + tl.maximum(irid, 0) * (N * H)
            a -= tl.load(i_rows[None, :, None] + offs_n[:, None, None] * H + offs_h[None, None, :], mask=zmask, other=0.0)
        s = tl.load(scale_ptr + offs_t, mask=t_ok, other=1.0)
        dla = tl.reduce(zt * a, 2, _sum_combine) / s[None, :]
        dla = tl.where(valid[None, :], dla, float("nan"))
        tl.store(dla_ptr + offs_t[None, :] * N + offs_n[:, None], dla, mask=out_ok)


@triton.jit
def _dla_fixed_kernel(
    z_ptr, u_ptr, scale_ptr, dla_ptr,
    T, N, H, K,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.full([BLOCK_T, BLOCK_K], 0.0, tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        h_ok = hh < H
        zt = tl.load(z_ptr + offs_t[:, None] * (N * H) + n * H + hh[None, :],
                     mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        u = tl.load(u_ptr + n * (H * K) + hh[:, None] * K + offs_k[None, :],
                    mask=h_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(zt, u, acc, input_precision=DOT_PREC)
    s = tl.load(scale_ptr + offs_t, mask=t_ok, other=1.0)
    tl.store(dla_ptr + offs_t[:, None] * (N * K) + n * K + offs_k[None, :], acc / s[:, None],
             mask=t_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------- launchers

def _matmul_dtype(allow_tf32: bool) -> torch.dtype:
    """The dtype of the small cuBLAS/CPU matmuls that prepare head-space tables. Without TF32 they run
    in float64 and are rounded to float32 once: exact fp32 results whatever the process-wide
    ``torch.backends.cuda.matmul.allow_tf32`` flag says, which is never read or changed here. With
    TF32 allowed they run in float32 (TF32 where the global flag permits it, within the same 1e-3)."""
    return torch.float32 if allow_tf32 else torch.float64


def _centred(rows: torch.Tensor, center: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows = rows.to(dtype)
    return rows - rows.mean(dim=-1, keepdim=True) if center else rows


def head_gram(W_O: torch.Tensor, allow_tf32: bool = False) -> torch.Tensor:
    """G[n] = W_O[n] W_O[n]^T, [N, H, H] float32."""
    w = W_O.to(_matmul_dtype(allow_tf32))
    return torch.bmm(w, w.transpose(1, 2)).to(torch.float32).contiguous()


def head_space_fixed(W_O: torch.Tensor, directions: torch.Tensor, center: bool, allow_tf32: bool = False) -> torch.Tensor:
    """U[n, :, k] = W_O[n] c(directions[k]), [N, H, K] float32."""
    mm = _matmul_dtype(allow_tf32)
    d = _centred(directions, center, mm)  # [K, D]
    return torch.matmul(W_O.to(mm), d.t()).to(torch.float32).contiguous()


def head_space_rows(W_O: torch.Tensor, rows: torch.Tensor, center: bool, allow_tf32: bool = False) -> torch.Tensor:
    """A[r, n, :] = W_O[n] c(rows[r]), [R, N, H] float32."""
    N, H, D = W_O.shape
    mm = _matmul_dtype(allow_tf32)
    d = _centred(rows, center, mm)  # [R, D]
    return torch.matmul(d, W_O.to(mm).reshape(N * H, D).t()).to(torch.float32).reshape(-1, N, H).contiguous()


def _check(z: torch.Tensor) -> None:
    if z.dtype == torch.float64:
        raise ValueError("the Triton kernels compute in float32; use backend='torch' or 'cpp' for float64 inputs")


def _gathered_launch(z, a, rid, irid, scale, g, dla, norms, nodes, with_dla, allow_tf32):
    T, N, H = z.shape
    H_P = _p2(H)
    block_t = 16
    # One head per program, 8 warps: the sm_90 compile report (benchmarks/triton_compile_report.py) shows
    # 4 heads x 4 warps at GELU-4L spilling 6.5 KB per thread (ptxas fell back to 32 registers), and
    # 1 head x 8 warps 32-40 registers, no spills, 20 KiB shared memory.
    block_n = 1
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    _dla_gathered_kernel[grid](
        z, a, rid, irid, scale, g, dla, norms, T, N, H, nodes,
        BLOCK_T=block_t, BLOCK_N=block_n, H_P=H_P, WITH_DLA=with_dla,
        HAS_INCORRECT=irid is not rid, DOT_PREC="tf32" if allow_tf32 else "ieee",
        num_warps=8,
    )


def head_norms(z: torch.Tensor, W_O: torch.Tensor, norms: torch.Tensor, allow_tf32: bool = False) -> None:
    """Write |r_n[t]|^2 into norms[:, :N] (norms is [T, nodes] float32, contiguous)."""
    _check(z)
    g = head_gram(W_O, allow_tf32)
    dummy = torch.empty(1, dtype=torch.int64, device=z.device)
    _gathered_launch(z, g, dummy, dummy, norms, g, norms, norms, norms.shape[1], False, allow_tf32)


def dla_fixed(z: torch.Tensor, W_O: torch.Tensor, directions: torch.Tensor, scale: torch.Tensor, center: bool,
              allow_tf32: bool = False) -> torch.Tensor:
    """dla [T, N, K] float32 for the fixed direction set (head-space table U, per-head tl.dot)."""
    _check(z)
    T, N, H = z.shape
    K = directions.shape[0]
    u = head_space_fixed(W_O, directions, center, allow_tf32)
    dla = torch.empty((T, N, K), dtype=torch.float32, device=z.device)
    block_t, block_k, block_h = 16, min(64, _p2(K)), min(64, _p2(H))
    grid = (triton.cdiv(T, block_t), N, triton.cdiv(K, block_k))
    _dla_fixed_kernel[grid](z, u, scale, dla, T, N, H, K, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_H=block_h,
                            DOT_PREC="tf32" if allow_tf32 else "ieee", num_warps=4)
    return dla


def dla_only(
    z: torch.Tensor,
    W_O: torch.Tensor,
    directions: torch.Tensor,
    scale: torch.Tensor,
    direction_ids: Optional[torch.Tensor],
    incorrect_ids: Optional[torch.Tensor],
    center: bool,
    *,
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The DLA-only request (no writers, no extra nodes): (dla [T, N] or [T, N, K], norms [T, N]).

    Inputs are contract-valid and contiguous (see `erasure_fast.contract`).
    """
    _check(z)
    T, N, H = z.shape
    norms = torch.empty((T, N), dtype=torch.float32, device=z.device)
    if direction_ids is None:
        dla = dla_fixed(z, W_O, directions, scale, center, allow_tf32)
        head_norms(z, W_O, norms, allow_tf32)
        return dla, norms
    # table rows only for the ids that occur (correct and incorrect), remapped to [0, K_u)
    ids = direction_ids
    both = ids if incorrect_ids is None else torch.cat([ids, incorrect_ids])
    uniq, inv = torch.unique(both.clamp(min=0), return_inverse=True)
    a = head_space_rows(W_O, directions.index_select(0, uniq), center, allow_tf32)  # [K_u, N, H]
    rid = torch.where(ids < 0, ids, inv[:T]).contiguous()
    irid = rid
    if incorrect_ids is not None:
        irid = torch.where(incorrect_ids < 0, incorrect_ids, inv[T:]).contiguous()
    g = head_gram(W_O, allow_tf32)
    dla = torch.empty((T, N), dtype=torch.float32, device=z.device)
    _gathered_launch(z, a, rid, irid, scale, g, dla, norms, N, True, allow_tf32)
    return dla, norms
