"""Fig 8: the writer's output split into its BOS part and the rest; the erasers' PR onto each.

The authors (``figure_recreation/fig8_bos_nonbos_proj_ratios.py``) compute both parts directly from the
writer's cached pattern and values -- pattern[..., 0] v[0] W_O and pattern[..., 1:] v[1:] W_O -- and
the PR of each of the 8 layer-2 heads' ``hook_result`` onto each part, summed over the heads per
(row, position) with pandas (which skips undefined ratios: a part that is exactly zero gets PR 0), the
last position dropped; median and 12.5-87.5 % band over the rows at each position.
``method="paper"`` does that (every head of the erasers' layer); ``method="erasers"`` sums the named
erasers only and keeps every position."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..capture import run_until, validate_tokens
from ..models import as_transformer_lens, model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, check_method, eraser_layer, head_indices
from .stats import CONVENTION, median_band
from .support import check_paper_support

METHODS = {
    "paper": "the sum of every head of the erasers' layer, the last position dropped",
    "erasers": "the sum of the erasers, every position",
}


def bos_split_values(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
                     method: str = "paper", capture: str = "auto") -> dict:
    """Fig 8's per-token values over the positions ``method`` keeps (`METHODS`), float64 on the CPU:
    ``pr_bos`` and ``pr_rest`` [B, P'] (PR of the summed heads onto the writer's BOS part and onto the
    rest; 0 where that part is exactly zero, as the authors' sum has it), ``bos_zero`` and ``rest_zero``
    [B, P'] (where each part is exactly zero), ``bos_share`` [B, P'] (r_bos . r_w / |r_w|^2) and
    ``heads`` (the summed heads' labels).

    Each part is computed directly, never as a difference that could cancel: a pass up to the writer's
    layer with every value but position 0's set to zero gives pattern[..., 0] v[0] (the BOS part), one
    with position 0's value set to zero gives pattern[..., 1:] v[1:] (the rest) -- whatever the attention
    layout (grouped-query attention: values per key/value head; output gates scale each part alike).
    Families where a head's output depends on the other heads' values (a norm across heads) do not split
    by key position and are refused before any forward pass. ``capture`` ("auto", "engine", "hooks", as
    in `erasure_fast.attribute`) is for the run that gives the heads' outputs; the two split passes
    intervene on the values, so they run on hooks."""
    model = as_transformer_lens(model)
    check_method(method, METHODS)
    spec = model_spec(model)
    tokens = validate_tokens(tokens, spec)
    w = head_indices(model, [writer], "writer")[0]
    wl, wh = divmod(w, spec.n_heads)
    es = head_indices(model, erasers, "erasers")
    layer = eraser_layer(model, writer, erasers)
    summed = list(range(layer * spec.n_heads, (layer + 1) * spec.n_heads)) if method == "paper" else es
    check_paper_support(model, "fig8", writer, erasers)
    res = attribute_with_hooks(model, tokens, [writer], capture=capture)

    def keep_values(keep_bos: bool):
        def hook(v, hook=None):
            v = v.clone()
            if keep_bos:
                v[:, 1:] = 0
            else:
                v[:, :1] = 0
            return v
        return hook

    z_hook, v_hook = f"blocks.{wl}.attn.hook_z", f"blocks.{wl}.attn.hook_v"
    W_O = spec.W_O[w]
    r_bos, r_rest = (run_until(model, tokens, [(v_hook, keep_values(keep_bos))], (), z_hook)[z_hook][:, :, wh].to(W_O) @ W_O
                     for keep_bos in (True, False))  # [B, P, D] each
    r_w = res.z[:, :, w].to(W_O) @ W_O
    r_sum = sum(res.z[:, :, e].to(W_O) @ spec.W_O[e] for e in summed)
    keep = slice(0, r_w.shape[1] - 1) if method == "paper" else slice(None)

    def pr(a, b):
        bb = (b * b).sum(-1)
        return torch.where(bb == 0, torch.zeros_like(bb), (a * b).sum(-1) / torch.where(bb == 0, 1, bb))

    out = dict(pr_bos=pr(r_sum, r_bos), pr_rest=pr(r_sum, r_rest), bos_zero=(r_bos * r_bos).sum(-1) == 0,
               rest_zero=(r_rest * r_rest).sum(-1) == 0, bos_share=(r_bos * r_w).sum(-1) / (r_w * r_w).sum(-1))
    out = {k: v[:, keep].cpu() if v.dtype == torch.bool else v[:, keep].double().cpu() for k, v in out.items()}
    out["heads"] = [spec.head_label(e) for e in summed]
    return out


def bos_split(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
              method: str = "paper", out_path: Optional[str] = None, capture: str = "auto"):
    """Fig 8 (`bos_split_values`: arguments, ``method``). Returns a DataFrame per position: PR of the
    summed heads onto the writer's BOS part and onto the rest (median, q0.125, q0.875 over the rows,
    `erasure_fast.paper.stats`), the number of rows where each part is exactly zero (``bos_zero_rows``,
    ``rest_zero_rows``: PR 0 there, as in the authors' sum -- position 0 has no rest under causal
    attention) and the median BOS share of |r_w|^2."""
    import pandas as pd

    v = bos_split_values(model, tokens, writer, erasers, method=method, capture=capture)
    table = pd.DataFrame(dict(position=np.arange(v["pr_bos"].shape[1])))
    for part in ("bos", "rest"):
        for name, column in zip(("median", "q0.125", "q0.875"), median_band(v[f"pr_{part}"].numpy(), axis=0)):
            table[f"pr_{part}_{name}"] = column
        table[f"{part}_zero_rows"] = v[f"{part}_zero"].sum(0).numpy()
    table["bos_share_median"] = median_band(v["bos_share"].numpy(), axis=0)[0]
    table.attrs["statistics"] = CONVENTION
    table.attrs["heads"] = v["heads"]
    if out_path:
        heads = v["heads"]
        summed = ", ".join(heads) if len(heads) <= 3 else f"{heads[0]} .. {heads[-1]}"
        fig, axes = new_figure((7, 5), 2, 1)
        for ax, part, words in ((axes[0], "bos", "BOS part"), (axes[1], "rest", "non-BOS part")):
            ax.plot(table.position, table[f"pr_{part}_median"], color="tab:blue")
            ax.fill_between(table.position, table[f"pr_{part}_q0.125"], table[f"pr_{part}_q0.875"], color="tab:blue", alpha=0.2)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_ylabel("PR (median, 12.5-87.5 %)")
            ax.set_title(f"PR of sum({summed}) onto {writer}'s {words}", fontsize=9)
        axes[1].set_xlabel("position")
        save(fig, out_path)
    return table
