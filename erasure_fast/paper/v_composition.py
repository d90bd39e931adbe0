"""Fig 5: the writer's DLA against the DLA of the erasers' OV image of its output, with a fit."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..capture import validate_tokens
from ..models import model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, center, eraser_layer, head_indices, ln_weight


def v_composition(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
                  out_path: Optional[str] = None, attention_aware: bool = False):
    """Fig 5. Per token: the writer's next-token DLA and the DLA of the erasers' OV image of the
    writer's LN-normalised output, sum_e (c(r_w)/s_ln1 * gamma) W_V[e] W_O[e] (paper: attention
    ignored, same position); with ``attention_aware`` the image is mixed by each eraser's real
    attention pattern. Returns (DataFrame of points, fit dict: slope, intercept, their standard errors)."""
    import pandas as pd

    spec = model_spec(model)
    w = head_indices(model, [writer])[0]
    es = head_indices(model, erasers)
    layer = eraser_layer(model, writer, erasers)
    tokens = validate_tokens(tokens, spec)
    if tokens.shape[0] * (tokens.shape[1] - 1) < 3:  # the fit needs 3 (writer DLA, composition DLA) points
        raise ValueError(f"tokens {tuple(tokens.shape)} give fewer than 3 next-token points for the fit")
    keep = (f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.attn.hook_pattern")
    res = attribute_with_hooks(model, tokens, [writer], keep_hooks=keep)
    B, P = res.z.shape[:2]
    r_w = res.z[:, :, w].to(spec.W_O) @ spec.W_O[w]  # [B, P, D]
    x = center(r_w) / res.extra[keep[0]].reshape(B, P, 1).to(r_w)
    gamma = ln_weight(model, layer, "ln1")
    if gamma is not None:
        x = x * gamma.to(x)
    W_V = model.W_V.detach()[layer].to(x)
    W_O = model.W_O.detach()[layer].to(x)
    heads = [e - layer * spec.n_heads for e in es]
    if attention_aware:
        A = res.extra[keep[1]].to(x)[:, heads]  # [B, E, P, P]
        per_head = torch.einsum("bpd,edk,ekm->bepm", x, W_V[heads], W_O[heads])  # [B, E, P, D]
        img = torch.einsum("beqp,bepm->bqm", A, per_head)
    else:
        img = torch.einsum("bpd,edk,ekm->bpm", x, W_V[heads], W_O[heads])
    ids = torch.full((B, P), -1, dtype=torch.long, device=r_w.device)
    tokens = tokens.to(r_w.device)
    ids[:, :-1] = tokens[:, 1:]
    d = spec.directions.to(r_w)[ids[:, :-1].clamp(min=0)]  # [B, P-1, D]
    if spec.center:
        d = center(d)
    s = res.final_scale[:, :-1].to(r_w)
    comp = (img[:, :-1] * d).sum(-1) / s
    wdla = res.writer_dla[:, :-1, 0].to(r_w)
    table = pd.DataFrame(dict(writer_dla=wdla.reshape(-1).double().cpu().numpy(),
                              v_composition_dla=comp.reshape(-1).double().cpu().numpy()))
    fit = linear_fit(table.writer_dla.to_numpy(), table.v_composition_dla.to_numpy())
    if out_path:
        fig, ax = new_figure((4.6, 4))
        ax.scatter(table.writer_dla, table.v_composition_dla, s=3, alpha=0.3)
        xs = np.linspace(table.writer_dla.min(), table.writer_dla.max(), 10)
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, color="tab:red",
                label=f"slope {fit['slope']:.3f} ± {fit['slope_se']:.3f}")
        ax.set_xlabel(f"{writer} DLA")
        ax.set_ylabel("V-composition DLA" + (" (attention-aware)" if attention_aware else " (same position)"))
        ax.legend(fontsize=8)
        ax.set_title(f"{writer} vs erasers' OV image", fontsize=9)
        save(fig, out_path)
    return table, fit


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least squares y = a + b x with standard errors of a and b."""
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
