"""Fig 3: the causal check -- remove the writer's clean output from the erasers' value input
(norm scales frozen to the clean run), and see the erasers' PR vanish."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..models import as_transformer_lens, model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, eraser_layer, head_indices
from .support import check_paper_support
from .value_path import ValuePath, kv_group, value_path, value_weights


def value_patch_hooks(model, spec, clean, writer: int, erasers: Sequence[int], layer: int, path: ValuePath) -> list:
    """Forward hooks removing the writer's clean output from the value input of ``erasers`` (flat
    indices, all in ``layer``), with every norm scale on the way frozen to the clean run (``clean``: its
    `AttributionResult`, holding ``path.scale_hooks``). The patch is then linear: each eraser's values
    lose x W_V, x = `ValuePath.value_input` of the writer's output; queries and keys are untouched.

    Values are per key/value head (blocks.{layer}.attn.hook_v). Under grouped-query attention an
    eraser shares its key/value head with other query heads; their outputs (hook_z) are put back to
    the clean run's, so exactly the erasers' value input is patched -- as if each query head had its
    own copy of the values."""
    H = spec.n_heads
    x = path.value_input(path.head_output(model, clean.z, writer), clean.extra)  # [B, P, D]
    W_V = value_weights(model, layer).to(x)  # [n_kv, D, dh]
    n_kv = W_V.shape[0]
    heads = [e - layer * H for e in erasers]
    groups = sorted({kv_group(spec, h, n_kv) for h in heads})
    delta = torch.einsum("bpd,gdk->bpgk", x, W_V[groups])  # [B, P, len(groups), dh]

    def patch_values(v, hook=None):
        if v.shape[2] != n_kv:
            raise RuntimeError(f"blocks.{layer}.attn.hook_v has {v.shape[2]} heads, expected {n_kv} key/value heads")
        v = v.clone()
        v[:, :, groups] -= delta.to(v)
        return v

    hooks = [(f"blocks.{layer}.attn.hook_v", patch_values)]
    others = [h for h in range(H) if h not in heads and kv_group(spec, h, n_kv) in groups]
    if others:  # query heads sharing a patched key/value head: keep their clean output
        clean_z = clean.z[:, :, [layer * H + h for h in others]]

        def restore_others(z, hook=None):
            z = z.clone()
            z[:, :, others] = clean_z.to(z)
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", restore_others))
    return hooks


def causal_runs(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
                backend: str = "auto", analysis: str = "fig3"):
    """Fig 3's two runs: (clean, patched) `AttributionResult`s onto ``writer``, the patched one with the
    writer's clean output removed from the erasers' value input (`value_patch_hooks`). Raises
    ValueError / `UnsupportedModelError` before any forward pass when the heads or the model do not fit."""
    model = as_transformer_lens(model)
    spec = model_spec(model)
    w = head_indices(model, [writer], "writer")[0]
    es = head_indices(model, erasers, "erasers")
    layer = eraser_layer(model, writer, erasers)
    check_paper_support(model, analysis, writer, erasers)
    path = value_path(model, w // spec.n_heads, layer)
    clean = attribute_with_hooks(model, tokens, [writer], backend=backend, keep_hooks=path.scale_hooks)
    hooks = value_patch_hooks(model, spec, clean, w, es, layer, path)
    patched = attribute_with_hooks(model, tokens, [writer], backend=backend, extra_hooks=hooks)
    return clean, patched


def causal_check(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS,
                 *, out_path: Optional[str] = None, backend: str = "auto", analysis: str = "fig3"):
    """Fig 3. Returns a DataFrame: node (erasers and resid points), PR onto the writer clean and patched
    (median, 25 %, 75 %). The writer's output reaches the erasers' value input through the norms on the
    way (a post-norm on the writer's attention output, the erasers' ln1), each with its scale frozen to
    the clean run (`erasure_fast.paper.value_path.ValuePath`); grouped-query attention is patched per query
    head (`value_patch_hooks`). Families where one head's output depends on the other heads' values are
    refused (`UnsupportedModelError`, before any forward pass)."""
    model = as_transformer_lens(model)
    import pandas as pd

    spec = model_spec(model)
    es = head_indices(model, erasers, "erasers")
    clean, patched = causal_runs(model, tokens, writer, erasers, backend=backend, analysis=analysis)
    layer = es[0] // spec.n_heads
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
        fig.suptitle(f"Causal check: {writer}'s clean output removed from layer-{layer} value input (norm scales frozen)", fontsize=10)
        save(fig, out_path)
    return table
