"""Figs 1 and 2: residual-stream PR and per-node PR onto a writer (from a scan or a batch)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from ..paths import expand_path
from .common import attribute_with_hooks
from .support import check_paper_support


def fig1_fig2(source, writer: str = "L0H2", *, model=None, out_dir: Optional[str] = None, capture: str = "auto"):
    """Residual PR (fig 1) and downstream-node PR (fig 2) onto ``writer``.

    ``source``: a ScanResult, a scan output directory (summary.parquet), or a token batch [B, P]
    (then ``model`` is needed; ``capture``: "auto", "engine" or "hooks" for its forward pass, as in
    `erasure_fast.attribute`). Returns (resid_table, node_table) DataFrames."""
    import pandas as pd

    from ..scanning.plots import fig1_resid, fig2_nodes

    if isinstance(source, torch.Tensor):
        check_paper_support(model, "fig1")
        res = attribute_with_hooks(model, source, [writer], capture=capture)
        rows = []
        rpr = res.resid_pr.reshape(-1, *res.resid_pr.shape[2:])[..., 0].double().cpu().numpy()
        for i, lab in enumerate(res.resid_labels):
            v = rpr[:, i][np.isfinite(rpr[:, i])]
            rows.append(dict(kind="resid", node=lab, writer=writer, downstream=False, median=np.median(v),
                             **{"q0.25": np.quantile(v, 0.25), "q0.75": np.quantile(v, 0.75)}))
        pr = res.pr.reshape(-1, *res.pr.shape[2:])[..., 0].double().cpu().numpy()
        down = res.downstream[:, 0].cpu().numpy()
        for i, lab in enumerate(res.node_labels):
            v = pr[:, i][np.isfinite(pr[:, i])]
            rows.append(dict(kind="node", node=lab, writer=writer, downstream=bool(down[i]), median=np.median(v),
                             **{"q0.25": np.quantile(v, 0.25), "q0.75": np.quantile(v, 0.75)}))
        summary = pd.DataFrame(rows)
        resid_labels = res.resid_labels
    else:
        if isinstance(source, (str, os.PathLike)):
            summary = pd.read_parquet(os.path.join(expand_path(source), "summary.parquet"))
        else:
            summary = source.summary
        resid_labels = summary[(summary.kind == "resid") & (summary.writer == writer)].node.tolist()
    if not (summary.writer == writer).any():
        raise ValueError(f"writer {writer!r} is not in the source (writers: {sorted(set(summary.writer.dropna()))})")

    class _Cfg:  # the two plot helpers only need the resid labels
        pass

    cfg = _Cfg()
    cfg.resid_labels = resid_labels
    resid = summary[(summary.kind == "resid") & (summary.writer == writer)].reset_index(drop=True)
    nodes = summary[(summary.kind == "node") & (summary.writer == writer)].reset_index(drop=True)
    if out_dir:
        out_dir = expand_path(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        fig1_resid(summary, cfg, [writer], os.path.join(out_dir, "paper_fig1_resid_pr.png"))
        fig2_nodes(summary, cfg, writer, os.path.join(out_dir, "paper_fig2_node_pr.png"))
    return resid[["node", "median", "q0.25", "q0.75"]], nodes[["node", "downstream", "median", "q0.25", "q0.75"]]
