"""Figs 1 and 2: residual-stream PR and per-node PR onto a writer (from a scan or a batch).

The authors (``figure_recreation/fig1_resid_onto_head_lineplots.py``, ``fig2_cleanup_barplots.py``)
take PR = a.w / |w|^2 of each cached ``hook_resid_*`` and of each head's ``hook_result`` and
``hook_mlp_out`` onto the writer's ``hook_result`` at every (row, position), BOS included, and draw
the median and the 12.5-87.5 % band over them all (`erasure_fast.paper.stats`). Here the residual
points follow from the component PRs by linearity (docs/math.md), the same numbers per token."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..paths import expand_path
from .common import attribute_with_hooks
from .stats import CONVENTION, band_row
from .support import check_paper_support

BAND_COLUMNS = ("q0.125", "q0.875")


def fig1_fig2(source, writer: str = "L0H2", *, model=None, out_dir: Optional[str] = None, capture: str = "auto"):
    """Residual PR (fig 1) and node PR (fig 2) onto ``writer``: median and 12.5-87.5 % band over every
    (row, position), as the authors computed them (`erasure_fast.paper.stats.CONVENTION`).

    ``source``: a token batch [B, P] (then ``model`` is needed; ``capture``: "auto", "engine" or
    "hooks" for its forward pass, as in `erasure_fast.attribute`) -- exact statistics; or a ScanResult
    or scan output directory (summary.parquet) -- the scan's histogram quantiles (its q0.125, q0.5,
    q0.875), each within one histogram bin of the exact value (the scan report gives the bin width).
    Returns (resid_table, node_table) DataFrames: node, [downstream,] median, q0.125, q0.875; each
    table's ``attrs["statistics"]`` says which of the two it holds."""
    import pandas as pd

    from ..scanning.plots import fig1_resid, fig2_nodes

    if isinstance(source, torch.Tensor):
        check_paper_support(model, "fig1")
        res = attribute_with_hooks(model, source, [writer], capture=capture)
        rpr = res.resid_pr.reshape(-1, *res.resid_pr.shape[2:])[..., 0].cpu().numpy()
        pr = res.pr.reshape(-1, *res.pr.shape[2:])[..., 0].cpu().numpy()
        down = res.downstream[:, 0].cpu().numpy()
        rows = [dict(kind="resid", node=lab, writer=writer, downstream=False, **band_row(rpr[:, i]))
                for i, lab in enumerate(res.resid_labels)]
        rows += [dict(kind="node", node=lab, writer=writer, downstream=bool(down[i]), **band_row(pr[:, i]))
                 for i, lab in enumerate(res.node_labels)]
        summary = pd.DataFrame(rows)
        resid_labels = res.resid_labels
        statistics = CONVENTION
    else:
        if isinstance(source, (str, os.PathLike)):
            summary = pd.read_parquet(os.path.join(expand_path(source), "summary.parquet"))
        else:
            summary = source.summary
        resid_labels = summary[(summary.kind == "resid") & (summary.writer == writer)].node.tolist()
        statistics = ("the scan's histogram quantiles (median = its q0.5): each within one histogram bin of the "
                      "exact 12.5 / 50 / 87.5 % percentile, NaN skipped")
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
        fig1_resid(summary, cfg, [writer], os.path.join(out_dir, "paper_fig1_resid_pr.png"), band=BAND_COLUMNS)
        fig2_nodes(summary, cfg, writer, os.path.join(out_dir, "paper_fig2_node_pr.png"), band=BAND_COLUMNS)
    tables = (resid[["node", "median", *BAND_COLUMNS]].copy(), nodes[["node", "downstream", "median", *BAND_COLUMNS]].copy())
    for table in tables:
        table.attrs["statistics"] = statistics
    return tables
