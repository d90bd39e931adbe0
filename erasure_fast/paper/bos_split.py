"""Fig 8: the writer's output split into its BOS part and the rest; the erasers' PR onto each."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..capture import run_until, validate_tokens
from ..models import as_transformer_lens, model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, head_indices
from .support import check_paper_support


def bos_split(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
              out_path: Optional[str] = None, capture: str = "auto"):
    """Fig 8. The writer's output split into its BOS part (attention to position 0) and the rest;
    PR of the erasers' summed output onto each part, by position. Returns a DataFrame per position:
    median PR onto the BOS part and onto the rest, and the BOS part's share of |r_w|^2.

    The BOS part is the writer's output with every value but position 0's set to zero (a second pass
    up to the writer's layer): its pattern at position 0 times that value, whatever the attention
    layout -- grouped-query attention (values per key/value head), output gates (they scale each part
    alike). Families where a head's output depends on the other heads' values (a norm across heads)
    do not split by key position and are refused before any forward pass. ``capture`` ("auto",
    "engine", "hooks", as in `erasure_fast.attribute`) is for the erasers' run; the writer's BOS-only
    pass intervenes on the values, so it and its whole-output twin run on hooks."""
    model = as_transformer_lens(model)
    import pandas as pd

    spec = model_spec(model)
    tokens = validate_tokens(tokens, spec)
    w = head_indices(model, [writer], "writer")[0]
    wl, wh = divmod(w, spec.n_heads)
    es = head_indices(model, erasers, "erasers")
    check_paper_support(model, "fig8", writer, erasers)
    res = attribute_with_hooks(model, tokens, [writer], capture=capture)

    def only_position_0(v, hook=None):
        v = v.clone()
        v[:, 1:] = 0
        return v

    z_hook = f"blocks.{wl}.attn.hook_z"
    bos = run_until(model, tokens, [(f"blocks.{wl}.attn.hook_v", only_position_0)], (), z_hook)[z_hook]
    # The whole output through the very same hooked computation, so that r_all - r_bos is the rest and
    # not the rounding difference between two ways of computing z (a writer that reads BOS only has no rest).
    full = run_until(model, tokens, [], (), z_hook)[z_hook]
    W_O = spec.W_O[w]
    r_bos = bos[:, :, wh].to(W_O) @ W_O  # [B, P, D]
    r_all = full[:, :, wh].to(W_O) @ W_O
    r_rest = r_all - r_bos
    r_rest[:, 0] = 0  # position 0 sees only itself (causal attention): no rest, whatever the rounding
    r_erase = sum(res.z[:, :, e].to(W_O) @ spec.W_O[e] for e in es)

    def pr(a, b):
        bb = (b * b).sum(-1)
        return torch.where(bb == 0, torch.full_like(bb, float("nan")), (a * b).sum(-1) / bb)

    pr_bos, pr_rest = pr(r_erase, r_bos), pr(r_erase, r_rest)
    share = (r_bos * r_all).sum(-1) / (r_all * r_all).sum(-1)
    table = pd.DataFrame(dict(position=np.arange(r_all.shape[1]),
                              pr_bos_median=pr_bos.double().nanmedian(0).values.cpu().numpy(),
                              pr_rest_median=pr_rest.double().nanmedian(0).values.cpu().numpy(),
                              bos_share_median=share.double().nanmedian(0).values.cpu().numpy()))
    if out_path:
        fig, ax = new_figure((6, 3.4))
        ax.plot(table.position, table.pr_bos_median, label=f"onto {writer}'s BOS part")
        ax.plot(table.position, table.pr_rest_median, label=f"onto {writer}'s non-BOS part")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("position")
        ax.set_ylabel("PR of erasers' sum (median)")
        ax.set_title(f"Erasure of {writer}'s BOS and non-BOS parts", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, out_path)
    return table
