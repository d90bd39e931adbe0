"""Fig 5: the writer's DLA against the DLA of the erasers' OV image of its output, with a fit.

The authors (``figure_recreation/fig5_DLA_scatter_plot.py``) take, on 10 corpus rows, at positions 32 to
P - 2 (each with its next token): the writer's DLA c(r_w) / s . W_U[:, next] and the DLA of
x sum_e W_V[e] W_O[e], x = c(r_w) / s_ln1 of the erasers' layer (attention ignored, same position),
then fit y = m x + b by least squares (lmfit; the same numbers as ordinary least squares) and print
m and b with +- 2 standard errors. `v_composition` does that by default (``start_pos=32``);
``start_pos=0`` takes every position, ``attention_aware=True`` mixes the image by each eraser's real
attention pattern (variants of this project)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..capture import validate_tokens
from ..models import as_transformer_lens, model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, eraser_layer, head_indices
from .support import check_paper_support
from .value_path import kv_group, value_path, value_weights


PAPER_START_POS = 32  # the first position of the authors' fit


def v_composition(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
                  start_pos: int = PAPER_START_POS, out_path: Optional[str] = None, attention_aware: bool = False):
    """Fig 5. Per token at positions ``start_pos`` .. P - 2 (the authors': 32; every position: 0): the
    writer's next-token DLA and the DLA of the erasers' OV image of the
    writer's share of their value input, sum_e x W_V[e] W_O[e] (paper: attention ignored, same
    position); with ``attention_aware`` the image is mixed by each eraser's real attention pattern.
    x is the writer's output r_w through the norms on the way with their scales frozen to the clean run
    (LayerNorm: c(r_w) / s_ln1 * gamma; RMSNorm: no centring; Gemma: gamma = 1 + w; post-norm blocks:
    the writer's post-attention norm first; residual / attention multipliers --
    `erasure_fast.paper.value_path.ValuePath`); W_V[e] is the eraser's key/value head's under grouped-query
    attention, W_O[e] what the eraser adds to the stream (`ModelSpec.W_O`). Families whose head output is not the
    attention-weighted values times W_O (output gates, norms across heads) are refused before any
    forward pass. Returns (DataFrame of points: row, position, writer_dla, v_composition_dla; fit dict:
    slope, intercept, their standard errors -- one each; the paper prints two --, n, start_pos)."""
    model = as_transformer_lens(model)
    import pandas as pd

    spec = model_spec(model)
    w = head_indices(model, [writer], "writer")[0]
    es = head_indices(model, erasers, "erasers")
    layer = eraser_layer(model, writer, erasers)
    tokens = validate_tokens(tokens, spec)
    if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
        raise ValueError(f"start_pos must be an int >= 0, got {start_pos!r}")
    if tokens.shape[0] * (tokens.shape[1] - 1 - start_pos) < 3:  # the fit needs 3 (writer DLA, composition DLA) points
        raise ValueError(f"tokens {tuple(tokens.shape)} give fewer than 3 next-token points from position {start_pos} "
                         "for the fit")
    check_paper_support(model, "fig5", writer, erasers)
    path = value_path(model, w // spec.n_heads, layer)
    pattern = f"blocks.{layer}.attn.hook_pattern"
    res = attribute_with_hooks(model, tokens, [writer], keep_hooks=path.scale_hooks + ((pattern,) if attention_aware else ()))
    B, P = res.z.shape[:2]
    x = path.value_input(path.head_output(model, res.z, w), res.extra)  # [B, P, D]
    W_V = value_weights(model, layer).to(x)  # [n_kv, D, dh]
    W_O = spec.W_O[layer * spec.n_heads:(layer + 1) * spec.n_heads].to(x)  # what each head adds to the stream
    heads = [e - layer * spec.n_heads for e in es]
    W_Ve = W_V[[kv_group(spec, h, W_V.shape[0]) for h in heads]]  # [E, D, dh]
    if attention_aware:
        A = res.extra[pattern].to(x)[:, heads]  # [B, E, P, P]
        per_head = torch.einsum("bpd,edk,ekm->bepm", x, W_Ve, W_O[heads])  # [B, E, P, D]
        img = torch.einsum("beqp,bepm->bqm", A, per_head)
    else:
        img = torch.einsum("bpd,edk,ekm->bpm", x, W_Ve, W_O[heads])
    ids = torch.full((B, P), -1, dtype=torch.long, device=x.device)
    tokens = tokens.to(x.device)
    ids[:, :-1] = tokens[:, 1:]
    d = spec.directions.to(x)[ids[:, :-1].clamp(min=0)]  # [B, P-1, D]
    if spec.center:
        d = d - d.mean(dim=-1, keepdim=True)
    s = res.final_scale[:, :-1].to(x)
    comp = ((img[:, :-1] * d).sum(-1) / s)[:, start_pos:]
    wdla = res.writer_dla[:, start_pos:-1, 0].to(x)
    rows, positions = np.meshgrid(np.arange(B), np.arange(start_pos, P - 1), indexing="ij")
    table = pd.DataFrame(dict(row=rows.reshape(-1), position=positions.reshape(-1),
                              writer_dla=wdla.reshape(-1).double().cpu().numpy(),
                              v_composition_dla=comp.reshape(-1).double().cpu().numpy()))
    fit = dict(linear_fit(table.writer_dla.to_numpy(), table.v_composition_dla.to_numpy()), start_pos=int(start_pos))
    if out_path:
        fig, ax = new_figure((4.6, 4))
        ax.scatter(table.writer_dla, table.v_composition_dla, s=3, alpha=0.3)
        xs = np.linspace(table.writer_dla.min(), table.writer_dla.max(), 10)
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, color="tab:red",
                label=f"slope {fit['slope']:.3f} ± {2 * fit['slope_se']:.3f} (2 se)")
        ax.set_xlabel(f"{writer} DLA")
        ax.set_ylabel("V-composition DLA" + (" (attention-aware)" if attention_aware else " (same position)"))
        ax.legend(fontsize=8)
        ax.set_title(f"{writer} vs erasers' OV image, positions >= {start_pos}", fontsize=9)
        save(fig, out_path)
    return table, fit


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least squares y = a + b x with the standard errors of a and b (residual variance over n - 2
    degrees of freedom: what lmfit reports for this model)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3:
        raise ValueError(f"need at least 3 finite points for a fit, got {n}")
    X = np.stack([np.ones(n), x], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    sigma2 = resid @ resid / (n - 2)
    cov = sigma2 * np.linalg.inv(X.T @ X)
    return dict(intercept=float(coef[0]), slope=float(coef[1]), intercept_se=float(np.sqrt(cov[0, 0])),
                slope_se=float(np.sqrt(cov[1, 1])), n=int(n))
