"""Benchmark workloads (one definition, used by the harness, the device script and the docs).

K1  next-token DLA of every head + dots / squared norms of every head and MLP output with every head
    as a writer (the fused operation at full width).
K2n next-token DLA only (gathered directions: W_U rows of the next tokens); cold = first call.
K2f logit-difference DLA with one fixed (correct, incorrect) pair.
S1  erasure scan of a token corpus: forward pass + attribution + aggregation (see harness.run_s1).
C1  capture: the forward pass without unembedding, keeping z, MLP outputs, embedding and final scale
    (TransformerLens hooks vs the capture engine, `erasure_fast.engine`), on S1's corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SHAPES = {
    "gelu-4l": dict(n_layers=4, n_heads=8, d_head=64, d_model=512, d_mlp=2048, d_vocab=48262, n_ctx=1024),
    "gpt2-small": dict(n_layers=12, n_heads=12, d_head=64, d_model=768, d_mlp=3072, d_vocab=50257, n_ctx=1024),
}


@dataclass
class KernelInputs:
    """Random activations of a model shape for T = batch * pos tokens (values do not affect speed)."""

    shape: str
    z: torch.Tensor  # [B, P, L, H, dh]
    mlp_out: torch.Tensor  # [B, P, L, D]
    scale: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, P]
    next_ids: torch.Tensor  # [B, P] (-1 at the last position)
    pair: tuple  # (correct, incorrect) token ids for K2f

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


def make_inputs(shape: str, n_tokens: int, device, dtype=torch.float32, seed: int = 0) -> KernelInputs:
    dims = SHAPES[shape]
    P = min(n_tokens, dims["n_ctx"])
    B = max(1, n_tokens // P)
    g = torch.Generator().manual_seed(seed)
    L, H, dh, D, V = (dims[k] for k in ("n_layers", "n_heads", "d_head", "d_model", "d_vocab"))
    z = torch.randn(B, P, L, H, dh, generator=g).to(device, dtype)
    mlp = torch.randn(B, P, L, D, generator=g).mul_(0.5).to(device, dtype)
    scale = (torch.rand(B, P, generator=g) + 0.5).to(device, dtype)
    # Zipf-like token ids, as in text (matters for unique-target DLA paths)
    ranks = torch.distributions.Pareto(1.0, 0.3).sample((B, P)).long().clamp(max=V) - 1
    perm = torch.randperm(V, generator=g)
    tokens = perm[ranks.clamp(0, V - 1)].to(device)
    nxt = torch.full_like(tokens, -1)
    nxt[:, :-1] = tokens[:, 1:]
    return KernelInputs(shape, z, mlp, scale, tokens, nxt, (int(perm[0]), int(perm[1])))


def kernel_args(inp: KernelInputs, workload: str, W_O: torch.Tensor, W_U: torch.Tensor,
                directions: Optional[torch.Tensor] = None, center: bool = True) -> dict:
    """The `fused_attribution` keyword arguments of K1 / K2n / K2f for the activations ``inp`` and the
    weights W_O [N, d_head, d_model] and W_U [d_model, d_vocab] (next-token ``directions``: W_U's
    columns as rows, W_U.T unless given), moved to z's device and dtype."""
    B, P, L, H, dh = inp.z.shape
    T = B * P
    z = inp.z.reshape(T, L * H, dh)
    W_O = W_O.to(z.device, z.dtype)
    scale = inp.scale.reshape(T)
    if workload == "K2f":
        c, i = inp.pair
        d = (W_U[:, c] - W_U[:, i]).to(z.device, z.dtype)[None]
        return dict(z=z, W_O=W_O, directions=d, scale=scale, writers=[], center=center, with_norms=False)
    if workload not in ("K1", "K2n"):
        raise ValueError(f"workload must be K1, K2n or K2f, got {workload!r}")
    directions = W_U.T.contiguous() if directions is None else directions
    args = dict(z=z, W_O=W_O, directions=directions.to(z.device, z.dtype), scale=scale,
                direction_ids=inp.next_ids.reshape(T), center=center)
    if workload == "K1":
        args.update(writers=list(range(L * H)), extra_nodes=inp.mlp_out.reshape(T, L, -1))
    else:
        args.update(writers=[], with_norms=False)
    return args


def random_weight_args(workload: str, shape: str, n_tokens: int, dtype=torch.float32, seed: int = 0) -> dict:
    """`kernel_args` on random weights of ``shape`` (W_O scaled by d_head^-1/2, a normal W_U) and
    `make_inputs`' activations, on the CPU: for timing the kernels and the public call without a model."""
    d = SHAPES[shape]
    N = d["n_layers"] * d["n_heads"]
    g = torch.Generator().manual_seed(seed + 1)
    W_O = (torch.randn(N, d["d_head"], d["d_model"], generator=g) * d["d_head"] ** -0.5).to(dtype)
    W_U = torch.randn(d["d_model"], d["d_vocab"], generator=g).to(dtype)
    return kernel_args(make_inputs(shape, n_tokens, "cpu", dtype, seed=seed), workload, W_O, W_U)


def flops(workload: str, shape: str, n_tokens: int):
    """Nominal FLOPs of the fused formulation (what the math page counts), or None where the work
    depends on the method: next-token DLA in head space costs per distinct target, not per token
    (K2n), and S1 is dominated by the model's forward pass.

    K1 counts the work that must be done: the projections, then every distinct dot product once.
    The head-head block of the dots is symmetric (every head is a writer), so it holds N(N+1)/2
    distinct values, its diagonal being the heads' squared norms; then M*N MLP-head dots, the M MLP
    norms and the N DLA dots, each 2*d_model FLOPs per token."""
    d = SHAPES[shape]
    N = d["n_layers"] * d["n_heads"]
    M = d["n_layers"]
    dh, D = d["d_head"], d["d_model"]
    T = n_tokens
    proj = 2 * T * N * dh * D
    if workload == "K1":
        return proj + 2 * T * D * (N * (N + 1) // 2 + M * N + M + N)
    if workload == "K2f":
        return 2 * T * N * dh + 2 * N * dh * D
    if workload == "C1":
        return forward_flops(shape, n_tokens)
    return None


def forward_flops(shape: str, n_tokens: int, seq: int = 1024) -> int:
    """Nominal FLOPs of a forward pass without unembedding over rows of ``seq`` tokens: per token and
    layer the QKV, output and MLP matmuls, and q.k plus pattern.v over the causal context (on average
    (seq + 1) / 2 keys)."""
    d = SHAPES[shape]
    H, dh, D, d_mlp = d["n_heads"], d["d_head"], d["d_model"], d["d_mlp"]
    per_layer = 2 * D * 3 * H * dh + 2 * H * dh * D + 2 * 2 * D * d_mlp + 2 * 2 * H * dh * (seq + 1) / 2
    return int(n_tokens * d["n_layers"] * per_layer)
