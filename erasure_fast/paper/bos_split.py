"""Fig 8: the writer's output split into its BOS part and the rest; the erasers' PR onto each."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..models import model_spec
from ..plotting import new_figure, save
from .common import DEFAULT_ERASERS, attribute_with_hooks, head_indices


def bos_split(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
              out_path: Optional[str] = None):
    """Fig 8. The writer's output split into its BOS part (attention to position 0) and the rest;
    PR of the erasers' summed output onto each part, by position. Returns a DataFrame per position:
    median PR onto the BOS part and onto the rest, and the BOS part's share of |r_w|^2."""
    import pandas as pd

    spec = model_spec(model)
    w = head_indices(model, [writer])[0]
    wl, wh = divmod(w, spec.n_heads)
    es = head_indices(model, erasers)
    keep = (f"blocks.{wl}.attn.hook_pattern", f"blocks.{wl}.attn.hook_v")
    res = attribute_with_hooks(model, tokens, [writer], keep_hooks=keep)
    A = res.extra[keep[0]][:, wh].to(spec.W_O)  # [B, Pq, Pk]
    v = res.extra[keep[1]][:, :, wh].to(spec.W_O)  # [B, Pk, dh]
    W_O = spec.W_O[w]
    z_bos = A[:, :, :1] * v[:, None, 0]  # [B, Pq, dh]
    r_bos = z_bos @ W_O
    r_all = res.z[:, :, w].to(W_O) @ W_O
    r_rest = r_all - r_bos
    r_erase = sum(res.z[:, :, e].to(W_O) @ spec.W_O[e] for e in es)

    def pr(a, b):
        bb = (b * b).sum(-1)
        return torch.where(bb == 0, torch.full_like(bb, float("nan")), (a * b).sum(-1) / bb)

    pr_bos, pr_rest = pr(r_erase, r_bos), pr(r_erase, r_rest)
    share = (r_bos * r_all).sum(-1) / (r_all * r_all).sum(-1)
    table = pd.DataFrame(dict(position=np.arange(A.shape[1]),
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
