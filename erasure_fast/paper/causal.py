"""Fig 3: the causal check -- remove the writer's clean output from the erasers' value input
(ln1 scale frozen to the clean run), and see the erasers' PR vanish."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..models import model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, center, eraser_layer, head_indices, ln_weight


def _value_patch(model, spec, clean, writer: int, erasers: Sequence[int], layer: int, clean_ln1_scale: torch.Tensor):
    """Hook on blocks.{layer}.attn.hook_v removing the writer's clean output from the value input of
    ``erasers`` with the layer's ln1 scale frozen to the clean run. With the scale frozen the patch is
    linear: v_e[s] -= (c(r_w[s]) / s_clean[s] * gamma) W_V[e] (queries and keys are untouched)."""
    H = spec.n_heads
    z_w = clean.z[:, :, writer].to(spec.W_O.dtype)  # [B, P, dh]
    r_w = z_w @ spec.W_O[writer].to(z_w)  # [B, P, D]
    x = center(r_w) / clean_ln1_scale.to(r_w)[..., None]
    gamma = ln_weight(model, layer, "ln1")
    if gamma is not None:
        x = x * gamma.to(x)
    W_V = model.W_V.detach()[layer]  # [H, D, dh]
    heads = [e - layer * H for e in erasers]
    delta = torch.einsum("bpd,hdk->bphk", x, W_V[heads].to(x))  # [B, P, len(heads), dh]

    def hook(v, hook=None):
        v = v.clone()
        v[:, :, heads] -= delta.to(v)
        return v

    return (f"blocks.{layer}.attn.hook_v", hook)


def causal_check(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS,
                 *, out_path: Optional[str] = None, backend: str = "auto"):
    """Fig 3. Returns a DataFrame: node (erasers and resid points), PR onto the writer clean and patched
    (median, 25 %, 75 %)."""
    import pandas as pd

    spec = model_spec(model)
    w = head_indices(model, [writer])[0]
    es = head_indices(model, erasers)
    layer = eraser_layer(model, writer, erasers)
    scale_hook = f"blocks.{layer}.ln1.hook_scale"
    clean = attribute_with_hooks(model, tokens, [writer], backend=backend, keep_hooks=(scale_hook,))
    ln1_scale = clean.extra[scale_hook].reshape(clean.z.shape[:2])
    patch = _value_patch(model, spec, clean, w, es, layer, ln1_scale)
    patched = attribute_with_hooks(model, tokens, [writer], backend=backend, extra_hooks=[patch])
    rows = []
    for label, a, b in [(spec.head_label(e), clean.pr[..., e, 0], patched.pr[..., e, 0]) for e in es] + \
            [(lab, clean.resid_pr[..., i, 0], patched.resid_pr[..., i, 0]) for i, lab in enumerate(clean.resid_labels)]:
        row = dict(node=label)
        for tag, t in (("clean", a), ("patched", b)):
            v = t.reshape(-1).double().cpu()
            v = v[~torch.isnan(v)]
            row.update({f"{tag}_median": float(v.median()), f"{tag}_q25": float(v.quantile(0.25)), f"{tag}_q75": float(v.quantile(0.75))})
        rows.append(row)
    table = pd.DataFrame(rows)
    if out_path:
        fig, axes = new_figure((10, 3.6), 1, 2)
        er = table[table.node.isin([spec.head_label(e) for e in es])]
        x = np.arange(len(er))
        for off, tag, color in ((-0.2, "clean", "tab:red"), (0.2, "patched", "tab:green")):
            axes[0].bar(x + off, er[f"{tag}_median"], width=0.4, color=color, label=tag)
        axes[0].set_xticks(x, er.node)
        axes[0].axhline(0, color="grey", lw=0.8)
        axes[0].set_ylabel(f"PR onto {writer}")
        axes[0].set_title("Erasers (median)", fontsize=9)
        axes[0].legend(fontsize=8)
        rs = table[~table.node.isin(er.node)]
        xr = np.arange(len(rs))
        for tag, color in (("clean", "tab:red"), ("patched", "tab:green")):
            axes[1].plot(xr, rs[f"{tag}_median"], marker="o", color=color, label=tag)
            axes[1].fill_between(xr, rs[f"{tag}_q25"], rs[f"{tag}_q75"], color=color, alpha=0.15)
        axes[1].set_xticks(xr, rs.node, rotation=45, ha="right")
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_title(f"Residual stream PR onto {writer}", fontsize=9)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Causal check: {writer}'s clean output removed from layer-{layer} value input (ln1 scale frozen)", fontsize=10)
        save(fig, out_path)
    return table
