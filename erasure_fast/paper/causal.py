"""Fig 3: the causal check -- remove the writer's clean output from the erasers' value input
(norm scales frozen to the clean run), and see the erasers' PR vanish.

The authors (``figure_recreation/fig3_patch_v_input_cleaners.py``) subtract the writer's clean
``hook_result`` from ``blocks.2.hook_v_input`` -- the value input of all 8 heads of layer 2 -- with
``blocks.2.ln1.hook_scale`` frozen to the clean run, and report the PR of every layer-2 head and of each
cached ``hook_resid_*`` onto the writer's clean output, clean and patched (median, 12.5-87.5 % band over
every row and position). ``method="paper"`` does that; ``method="erasers"`` patches only the erasers'
value input (the other heads of their layer keep their clean values)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..models import as_transformer_lens, model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, check_method, eraser_layer, head_indices
from .stats import CONVENTION, band_row
from .support import check_paper_support
from .value_path import ValuePath, kv_group, value_path, value_weights

METHODS = {  # method -> whose value input the writer's clean output is removed from
    "paper": "every head of the erasers' layer (the authors' hook_v_input patch)",
    "erasers": "the erasers only (the other heads of their layer keep their clean values)",
}


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


def patched_heads(model, writer, erasers, method: str) -> list:
    """The flat indices of the heads whose value input fig 3 patches (`METHODS`)."""
    check_method(method, METHODS)
    spec = model_spec(model)
    layer = eraser_layer(model, writer, erasers)
    if method == "paper":
        return list(range(layer * spec.n_heads, (layer + 1) * spec.n_heads))
    return head_indices(model, erasers, "erasers")


def causal_runs(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
                method: str = "paper", backend: str = "auto", analysis: str = "fig3"):
    """Fig 3's two runs: (clean, patched) `AttributionResult`s onto ``writer``, the patched one with the
    writer's clean output removed from the value input of the heads ``method`` names (`METHODS`,
    `value_patch_hooks`). Raises ValueError / `UnsupportedModelError` before any forward pass when the
    heads, the method or the model do not fit."""
    model = as_transformer_lens(model)
    spec = model_spec(model)
    w = head_indices(model, [writer], "writer")[0]
    heads = patched_heads(model, writer, erasers, method)
    layer = heads[0] // spec.n_heads
    check_paper_support(model, analysis, writer, erasers)
    path = value_path(model, w // spec.n_heads, layer)
    clean = attribute_with_hooks(model, tokens, [writer], backend=backend, keep_hooks=path.scale_hooks)
    hooks = value_patch_hooks(model, spec, clean, w, heads, layer, path)
    patched = attribute_with_hooks(model, tokens, [writer], backend=backend, extra_hooks=hooks)
    return clean, patched


def causal_check(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS,
                 *, method: str = "paper", out_path: Optional[str] = None, backend: str = "auto", analysis: str = "fig3"):
    """Fig 3. Returns a DataFrame: node (the patched heads -- ``method="paper"``: every head of the
    erasers' layer, as the authors patch and plot them; ``"erasers"``: the erasers -- then the resid
    points), ``eraser`` (whether the node is one of ``erasers``), PR onto the writer's clean output,
    clean and patched: median, q0.125, q0.875 over every row and position (`erasure_fast.paper.stats`).
    The writer's output reaches the value input through the norms on the way (a post-norm on the
    writer's attention output, the erasers' ln1), each with its scale frozen to the clean run
    (`erasure_fast.paper.value_path.ValuePath`); grouped-query attention is patched per query head
    (`value_patch_hooks`). Families where one head's output depends on the other heads' values are
    refused (`UnsupportedModelError`, before any forward pass)."""
    model = as_transformer_lens(model)
    import pandas as pd

    spec = model_spec(model)
    es = head_indices(model, erasers, "erasers")
    shown = patched_heads(model, writer, erasers, method)
    clean, patched = causal_runs(model, tokens, writer, erasers, method=method, backend=backend, analysis=analysis)
    layer = shown[0] // spec.n_heads
    rows = []
    for label, eraser, a, b in [(spec.head_label(e), e in es, clean.pr[..., e, 0], patched.pr[..., e, 0]) for e in shown] + \
            [(lab, False, clean.resid_pr[..., i, 0], patched.resid_pr[..., i, 0]) for i, lab in enumerate(clean.resid_labels)]:
        rows.append(dict(node=label, eraser=eraser, **band_row(a.cpu().numpy(), "clean_"), **band_row(b.cpu().numpy(), "patched_")))
    table = pd.DataFrame(rows)
    table.attrs["statistics"] = CONVENTION
    if out_path:
        fig, axes = new_figure((10, 3.6), 1, 2)
        er = table[table.node.isin([spec.head_label(e) for e in shown])]
        x = np.arange(len(er))
        for off, tag, color in ((-0.2, "clean", "tab:red"), (0.2, "patched", "tab:green")):
            axes[0].bar(x + off, er[f"{tag}_median"], width=0.4, color=color, label=tag)
        axes[0].set_xticks(x, er.node)
        axes[0].axhline(0, color="grey", lw=0.8)
        axes[0].set_ylabel(f"PR onto {writer}")
        axes[0].set_title(f"Layer-{layer} heads with a patched value input (median)", fontsize=9)
        axes[0].legend(fontsize=8)
        rs = table[~table.node.isin(er.node)]
        xr = np.arange(len(rs))
        for tag, color in (("clean", "tab:red"), ("patched", "tab:green")):
            axes[1].plot(xr, rs[f"{tag}_median"], marker="o", color=color, label=tag)
            axes[1].fill_between(xr, rs[f"{tag}_q0.125"], rs[f"{tag}_q0.875"], color=color, alpha=0.15)
        axes[1].set_xticks(xr, rs.node, rotation=45, ha="right")
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_title(f"Residual stream PR onto {writer} (median, 12.5-87.5 %)", fontsize=9)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Causal check: {writer}'s clean output removed from the value input of {METHODS[method].split(' (')[0]} "
                     "(norm scales frozen)", fontsize=10)
        save(fig, out_path)
    return table
