"""Per-token erasure statistics of every (node, writer) pair, and their null counterparts.

For node output a and writer output w at one token (docs/math.md, "Ranking erasure"):

    pr   = a.w / |w|^2            projection ratio: the fraction of w that a adds (< 0: removes)
    pv   = a.w / |w|              projection value: how much of w's direction a removes, in residual units
    cos  = a.w / (|a| |w|)        cosine: how much of a is about w
    apr  = pr * |cos|             alignment-weighted PR
    es   = pr * |cos| * |w| / |x| erasure score: the fraction of w removed (pr), counted to the degree
         = pv * |cos| / |x|       that the node's output is about w (|cos|) and that w matters in the
                                  residual stream (|w| / |x|, x = the final residual stream, centred
                                  for LayerNorm models: |x| = sqrt(d_model) * final-norm scale)

Measured on planted models (benchmarks/ranking_ground_truth.py, tests/test_ranking.py): raw PR and
apr over-rank a large node with an incidental component along a small-norm writer (both grow as
1 / |w|); pv over-ranks a large noisy node with a small constant component along the writer; cos
cannot order equally aligned erasers of graded strength. es ranks every planted eraser first, in the
order of its strength, in all of them -- it is the default.

The null of each statistic is the same formula with w replaced by a random direction r_w of the
same norm (one fixed unit vector per writer, seeded): what a node shows against a direction nothing
in the model relates to. Null dots a.r_w come from head space for the heads (z_n . W_O[n] r_w) and
directly for the MLP outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..backends.scan_kernels import scan_kernel, scan_rows
from .aggregate import SeriesGroup, SeriesStats, centred_bins

# name: (histogram lo, hi, bins) -- the quantiles' resolution is (hi - lo) / bins; bins centred on
# round values (`centred_bins`), so cos = +-1 and 0 lie mid-bin
STATISTICS = {
    "es": centred_bins(1.0, 0.0005),  # |ES| <= |a| / |x|, below 1 unless a node outgrows the final stream
    "apr": centred_bins(3.0, 0.005),
    "pv": centred_bins(100.0, 0.1),
    "cos": centred_bins(1.0, 0.002),
}
NULL_STATISTICS = {"es_null": STATISTICS["es"], "apr_null": STATISTICS["apr"], "pr_null": centred_bins(3.0, 0.005),
                   "pv_null": STATISTICS["pv"], "cos_null": STATISTICS["cos"]}
# The order of the compiled kernel's statistics (csrc/scan_aggregates.h, pair_stats_batch).
PAIR_STATISTICS = ("es", "apr", "pv", "cos", "es_null", "apr_null", "pr_null", "pv_null", "cos_null")
assert set(PAIR_STATISTICS) == set(STATISTICS) | set(NULL_STATISTICS)


def null_directions(seed: int, d_model: int, n_writers: int, dtype=torch.float64) -> torch.Tensor:
    """[d_model, W] unit columns, one random direction per writer (the null's), from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(d_model, n_writers, generator=g, dtype=torch.float64)
    return (r / r.norm(dim=0, keepdim=True)).to(dtype)


@dataclass(frozen=True)
class NullReference:
    """The null's random unit directions [d_model, W] (one per writer), and the same directions in
    each head's space, W_O[n] r_w [N, d_head, W] (float64; z . W_O[n] r_w = head n's output . r_w)."""

    directions: torch.Tensor
    head_directions: torch.Tensor

    @property
    def d_model(self) -> int:
        return self.directions.shape[0]

    def to(self, device) -> "NullReference":
        """These directions on ``device`` (itself where they are there)."""
        if self.directions.device == torch.device(device):
            return self
        return NullReference(self.directions.to(device), self.head_directions.to(device))

    @classmethod
    def for_scan(cls, W_O: torch.Tensor, seed: int, n_writers: int) -> "NullReference":
        """W_O [N, d_head, d_model]: every head's output matrix."""
        R = null_directions(seed, W_O.shape[-1], n_writers)
        return cls(directions=R, head_directions=torch.einsum("nhd,dw->nhw", W_O.detach().cpu().double(), R))


def _nan_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.full_like(num, float("nan")), num / torch.where(den == 0, torch.ones_like(den), den))


def pair_values(dots: torch.Tensor, norms: torch.Tensor, writers: torch.Tensor, null_dots: torch.Tensor,
                resid_norm: torch.Tensor, pairs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every statistic (and its null) per token for the selected pairs: dots [T, n_nodes, W] node .
    writer, norms [T, n_nodes] squared node norms, writers [W] node indices of the writers, null_dots
    [T, P] node . r_w (unit r_w) of each pair (`null_dots`), resid_norm [T] |x| of the final residual
    stream, pairs [P] flat indices node * W + writer. Returns {name: [T, P]} in float64, NaN where a
    norm is 0."""
    T, n_nodes, W = dots.shape
    pairs = pairs.to(dots.device)
    node, writer = pairs // W, pairs % W
    d = dots.reshape(T, -1).index_select(1, pairs).double()
    nd = null_dots.double()
    node_norm = norms.double().clamp(min=0).sqrt()  # [T, n_nodes]
    a = node_norm.index_select(1, node)
    w = node_norm.index_select(1, writers.to(dots.device)[writer])
    x = resid_norm.double().reshape(T, 1)
    pr = _nan_div(d, w * w)
    pv = _nan_div(d, w)
    cos = _nan_div(d, a * w).clamp(-1.0, 1.0)  # |cos| <= 1; rounding must not put -1 in the underflow bin
    pr_null = _nan_div(nd, w)
    cos_null = _nan_div(nd, a).clamp(-1.0, 1.0)
    return dict(es=_nan_div(pv * cos.abs(), x), apr=pr * cos.abs(), pv=pv, cos=cos,
                es_null=_nan_div(nd * cos_null.abs(), x), apr_null=pr_null * cos_null.abs(), pr_null=pr_null,
                pv_null=nd, cos_null=cos_null)


def fold_pair_values(stats: Dict[str, SeriesStats], dots: torch.Tensor, norms: torch.Tensor, writers: torch.Tensor,
                     null_dots: torch.Tensor, resid_norm: torch.Tensor, pairs: torch.Tensor,
                     bucket: torch.Tensor, group: Optional[SeriesGroup] = None) -> None:
    """Fold one batch's `pair_values` (arguments as there; bucket [T] each token's position bucket)
    into ``stats`` ({name: SeriesStats over the pairs}: one with several buckets gets each token in
    its bucket, one with a single bucket every token): in one compiled pass that never materialises
    them (csrc/scan_aggregates.h) when the extension is built, else through
    `pair_values` and one `SeriesGroup` pass (``group``: the group of ``stats`` in `PAIR_STATISTICS`
    order, kept by the caller so that its constants are made once; formed here when not given)."""
    kernel = scan_kernel("pair_stats_batch", dots)
    if kernel is None:
        values = pair_values(dots, norms, writers, null_dots, resid_norm, pairs)
        if group is None:
            group = pair_group(stats)
        group.update([values[name] for name in PAIR_STATISTICS], bucket.to(dots.device))
        return
    parts = [stats[name] for name in PAIR_STATISTICS]
    T = dots.shape[0]
    bucket = bucket.detach().to("cpu", torch.int64).reshape(T)
    n_buckets = max(p.B for p in parts)
    as_np = lambda t, dtype: t.detach().to(dtype).contiguous().numpy()  # noqa: E731
    # one compiled pass: each token's statistics go to its bucket's rows of the histograms that keep
    # buckets, to row 0 of the others (dots read in place: [n_nodes, W] rows contiguous)
    counted, mean_b, m2_b = kernel(
        scan_rows(dots.detach()).numpy(), as_np(norms, dots.dtype), as_np(null_dots, dots.dtype),
        as_np(resid_norm.reshape(T), torch.float64), as_np(writers, torch.int64), as_np(pairs, torch.int64),
        np.array([p.lo for p in parts]), np.array([1.0 / p.bin_width for p in parts]),
        np.array([p.nb for p in parts], np.int64), [p.hist for p in parts], bucket.numpy(), n_buckets)
    per_bucket = np.bincount(bucket.numpy(), minlength=n_buckets)
    for k, part in enumerate(parts):
        tokens = per_bucket if part.B > 1 else np.array([T])
        part.fold_batch(tokens, counted[k, :part.B], mean_b[k, :part.B], m2_b[k, :part.B])


def pair_group(stats: Dict[str, SeriesStats]) -> SeriesGroup:
    """The ranking statistics ``stats`` ({name: SeriesStats}) as one `SeriesGroup`, in `PAIR_STATISTICS` order."""
    return SeriesGroup([stats[name] for name in PAIR_STATISTICS])


@dataclass(frozen=True)
class NullGroup:
    """Consecutive nodes [first, last) of one kind (heads, or MLPs from node n_heads on) whose pairs
    have the same writer columns ``cols`` [k]; their null dots fill columns offset .. offset + (last -
    first) * k of `null_dots`' output, node by node."""

    first: int
    last: int
    cols: torch.Tensor
    offset: int


def null_groups(pairs: torch.Tensor, n_writers: int, n_heads: int) -> List[NullGroup]:
    """The `NullGroup`s of ``pairs`` [P] (flat node * W + writer, any order): runs of pairs of one node,
    merged while the next node is of the same kind and reads the same writers (a layer's heads do)."""
    nodes = (pairs // n_writers).tolist()
    cols = (pairs % n_writers).tolist()
    groups: List[NullGroup] = []
    i = 0
    while i < len(nodes):
        j = i
        while j < len(nodes) and nodes[j] == nodes[i]:
            j += 1
        n, c = nodes[i], cols[i:j]
        prev = groups[-1] if groups else None
        if (prev is not None and prev.last == n and (prev.first < n_heads) == (n < n_heads)
                and prev.cols.tolist() == c):
            groups[-1] = NullGroup(prev.first, n + 1, prev.cols, prev.offset)
        else:
            groups.append(NullGroup(n, n + 1, torch.tensor(c, dtype=torch.int64), i))
        i = j
    return groups


def null_dots(z: torch.Tensor, mlp_out: Optional[torch.Tensor], null: NullReference,
              groups: Sequence[NullGroup]) -> torch.Tensor:
    """node . r_w of every ranked pair: z [T, N, d_head], mlp_out [T, L, d_model] (None for an
    attention-only model), ``groups`` = `null_groups` of the pairs -> [T, P] (token-major: one column
    per pair, in the pairs' order), in the activations' accumulation dtype (float64 for float64, else
    float32), as the attribution's dots are. Heads' dots come from head space (W_O[n] r_w . z_n); only
    the pairs' columns are computed. On the CPU with the extension built, one compiled pass reads every
    node's activations in place (csrc/null_dots.h); elsewhere one batched product per group fills its
    columns."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    T, N = z.shape[0], z.shape[1]
    P = sum((g.last - g.first) * len(g.cols) for g in groups)
    kernel = scan_kernel("null_dots", z.new_empty(0, dtype=dtype))
    if kernel is not None and P > 0:  # (no pairs: no task to say how many tokens)
        return _compiled_null_dots(kernel, z, mlp_out, null, groups, dtype, P)
    out = torch.empty(T, P, dtype=dtype, device=z.device)
    for g in groups:
        G, k = g.last - g.first, len(g.cols)
        into = out[:, g.offset:g.offset + G * k].view(T, G, k)
        cols = g.cols.to(null.directions.device)
        if g.first < N:  # [G, T, dh] x [G, dh, k], z read in place
            U = null.head_directions[g.first:g.last].index_select(2, cols).to(z.device, dtype)
            into.copy_(torch.bmm(z[:, g.first:g.last].to(dtype).transpose(0, 1), U).transpose(0, 1))
        else:  # [T, d_model] x [d_model, k] per MLP
            R = null.directions.index_select(1, cols).to(z.device, dtype)
            for i in range(G):
                into[:, i].copy_(mlp_out[:, g.first - N + i].to(dtype) @ R)
    return out


def _compiled_null_dots(kernel, z: torch.Tensor, mlp_out: Optional[torch.Tensor], null: NullReference,
                        groups: Sequence[NullGroup], dtype: torch.dtype, P: int) -> torch.Tensor:
    """`null_dots` by the compiled kernel: one task per node, its activations [T, depth] a view of z or
    mlp_out (rows contiguous), its directions [depth, k], its first column (see csrc/null_dots.h)."""
    def rows(x: torch.Tensor) -> torch.Tensor:  # [T, nodes, depth], each node's rows contiguous
        x = x.detach().to(dtype)
        return x if x.stride(-1) == 1 else x.contiguous()

    N = z.shape[1]
    z = rows(z)
    mlp_out = None if mlp_out is None else rows(mlp_out)
    xs, dirs, offsets = [], [], []
    for g in groups:
        k = len(g.cols)
        if g.first < N:
            U = null.head_directions[g.first:g.last].index_select(2, g.cols).to(dtype)  # [G, dh, k]
            dirs += [U[i].contiguous().numpy() for i in range(g.last - g.first)]
            xs += [z[:, n].numpy() for n in range(g.first, g.last)]
        else:
            R = null.directions.index_select(1, g.cols).to(dtype).contiguous().numpy()  # [d_model, k]
            dirs += [R] * (g.last - g.first)
            xs += [mlp_out[:, n - N].numpy() for n in range(g.first, g.last)]
        offsets += [g.offset + i * k for i in range(g.last - g.first)]
    return torch.from_numpy(kernel(xs, dirs, np.array(offsets, np.int64), P))
