"""Paper-style figures from a scan summary (matplotlib figures, no pyplot: see erasure_fast.plotting)."""

from __future__ import annotations

import os
import re
from typing import Dict, Optional, Tuple

import numpy as np

from ..plotting import colormap, new_figure, save
from .plan import PR_HI, PR_LO
from .ranking import DEFAULT_RANK, featured_writers


def node_order(label: str):
    """Sort key putting each layer's heads, then its MLP: (layer, 0, head) or (layer, 1, 0)."""
    if label.startswith("MLP"):
        return int(label[3:]), 1, 0
    layer, head = label[1:].split("H")
    return int(layer), 0, int(head)


def written(resid_labels, writer: str) -> np.ndarray:
    """[len(resid_labels)] bool: the residual points the writer head ``writer`` ("L2H3") has written
    to -- resid_mid / resid_post of its own layer on, resid_pre of later layers. Before them its
    output is not in the stream: a PR onto it there is about a direction nothing has written yet."""
    layer = node_order(writer)[0]
    out = []
    for label in resid_labels:
        kind, at = re.fullmatch(r"resid_(pre|mid|post)(\d+)", label).groups()
        out.append(int(at) > layer if kind == "pre" else int(at) >= layer)
    return np.array(out, dtype=bool)


def _at_range_edge(values) -> Tuple[np.ndarray, np.ndarray]:
    """``values`` with each +-inf (a scan summary's quantile or median beyond its histogram's range)
    placed at that range's edge, so it can be drawn, and the mask of those: the figures mark them
    instead of dropping a NaN whisker or band without a word. Finite values are left as they are."""
    v = np.asarray(values, dtype=float)
    return np.where(v == np.inf, PR_HI, np.where(v == -np.inf, PR_LO, v)), np.isinf(v)


def _mark_beyond(ax, x, y, beyond) -> None:
    """Triangles at the range's edge where a value was beyond it, and a note saying what they are."""
    if not beyond.any():
        return
    up = beyond & (y >= PR_HI)
    ax.plot(x[up], y[up], "^", color="black", ms=5, ls="none")
    ax.plot(x[beyond & ~up], y[beyond & ~up], "v", color="black", ms=5, ls="none")
    ax.text(0.99, 0.02, f"triangles: beyond the histogram's range [{PR_LO:g}, {PR_HI:g}]", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, color="black")


def _band_words(band: Tuple[str, str]) -> str:
    """("q0.25", "q0.75") -> "25-75 %"."""
    return "-".join(f"{100 * float(c[1:]):g}" for c in band) + " %"


def fig1_resid(summary, cfg, writers, path: str, band: Tuple[str, str] = ("q0.25", "q0.75"),
               labels: Optional[Dict[str, str]] = None, title: Optional[str] = None, from_writer: bool = False) -> str:
    """Median residual-stream PR onto each writer across resid points, with the band between the
    summary's quantile columns ``band`` (paper Fig. 1). ``labels``: legend text per writer; ``title``:
    the plot's (default: what it shows); ``from_writer``: each writer from the points it has written
    to on (`written`)."""
    fig, ax = new_figure((7, 3.6))
    x = np.arange(len(cfg.resid_labels))
    for w in writers:
        r = summary[(summary.kind == "resid") & (summary.writer == w)].set_index("node").loc[cfg.resid_labels]
        keep = written(cfg.resid_labels, w) if from_writer else np.ones(len(x), dtype=bool)
        med, med_beyond = _at_range_edge(r["median"].to_numpy()[keep])
        lo, lo_beyond = _at_range_edge(r[band[0]].to_numpy()[keep])
        hi, hi_beyond = _at_range_edge(r[band[1]].to_numpy()[keep])
        ax.plot(x[keep], med, marker="o", label=(labels or {}).get(w, w))
        ax.fill_between(x[keep], lo, hi, alpha=0.2)
        _mark_beyond(ax, np.concatenate([x[keep]] * 3), np.concatenate([med, lo, hi]),
                     np.concatenate([med_beyond, lo_beyond, hi_beyond]))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(1, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, cfg.resid_labels, rotation=45, ha="right")
    ax.set_ylabel("projection ratio onto writer")
    if title is None:
        ax.set_title(f"Residual stream PR onto writer (median, {_band_words(band)})")
    else:
        ax.set_title(title, fontsize=9)
    if writers:
        ax.legend(fontsize=8)
    else:  # e.g. every ratio NaN (a writer whose output is zero): say so rather than draw an empty legend
        ax.text(0.5, 0.5, "no writer to show: no ranked pair has a finite median", transform=ax.transAxes,
                ha="center", va="center", color="grey")
    return save(fig, path)


def fig2_nodes(summary, cfg, writer: str, path: str, band: Tuple[str, str] = ("q0.25", "q0.75")) -> str:
    """Median PR of every downstream head and MLP onto one writer, layers separated, whiskers at the
    summary's quantile columns ``band`` (paper Fig. 2)."""
    rows = summary[(summary.kind == "node") & (summary.writer == writer) & summary.downstream]
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: node_order(rows.node.iloc[i]))]
    fig, ax = new_figure((max(6, 0.28 * len(rows)), 3.8))
    x = np.arange(len(rows))
    med, med_beyond = _at_range_edge(rows["median"].to_numpy())
    q_lo, lo_beyond = _at_range_edge(rows[band[0]].to_numpy())
    q_hi, hi_beyond = _at_range_edge(rows[band[1]].to_numpy())
    colors = ["tab:red" if m < 0 else "tab:blue" for m in med]
    ax.bar(x, med, color=colors, alpha=0.8)
    ax.errorbar(x, med, yerr=np.vstack([np.abs(med - q_lo), np.abs(q_hi - med)]), fmt="none", ecolor="black", lw=0.8,
                capsize=2)
    _mark_beyond(ax, np.concatenate([x] * 3), np.concatenate([med, q_lo, q_hi]),
                 np.concatenate([med_beyond, lo_beyond, hi_beyond]))
    labels = rows.node.tolist()
    prev = None
    for i, lab in enumerate(labels):
        layer = node_order(lab)[0]
        if prev is not None and layer != prev:
            ax.axvline(i - 0.5, color="grey", lw=0.6, ls=":")
        prev = layer
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_ylabel(f"PR onto {writer}")
    ax.set_title(f"PR of downstream heads and MLPs onto {writer} (median, {_band_words(band)})", fontsize=9)
    return save(fig, path)


def heatmap(summary, cfg, path: str) -> str:
    """Median PR for every (node, writer) pair; pairs that are not downstream are masked."""
    nodes = summary[summary.kind == "node"]
    mat = nodes.pivot(index="node", columns="writer", values="median").loc[cfg.node_labels, cfg.writer_labels]
    mask = nodes.pivot(index="node", columns="writer", values="downstream").loc[cfg.node_labels, cfg.writer_labels]
    data = np.where(mask.to_numpy(dtype=bool), mat.to_numpy(dtype=float), np.nan)
    vmax = np.nanmax(np.abs(data)) if np.isfinite(data).any() else 1.0
    fig, ax = new_figure((0.25 * len(cfg.writer_labels) + 3, 0.2 * len(cfg.node_labels) + 2))
    cmap = colormap("RdBu").with_extremes(bad="#d9d9d9")  # grey: pairs not downstream of the writer
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cfg.writer_labels)), cfg.writer_labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(cfg.node_labels)), cfg.node_labels, fontsize=6)
    ax.set_xlabel("writer")
    ax.set_ylabel("node")
    ax.set_title("Median PR of node onto writer (grey: not downstream)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save(fig, path)


def all_plots(out_dir: str, summary, cfg, focus: str, rank_by: str = DEFAULT_RANK) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Every plot of the report: ({file name: path} of those drawn, {file name: error} of those that
    failed). One plot failing does not stop the others. Fig 1 shows the writers that
    `ranking.featured_writers` picks by ``rank_by`` (its title says which), each from the points it has
    written to on; fig 2 the ``focus`` writer. The plots themselves show PR, as the paper does."""
    featured, reason = featured_writers(summary, rank_by)
    writers = [w for w, _ in featured]
    labels = {w: f"{w} (erased by {', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})" for w, nodes in featured}
    title = f"Residual stream PR onto the {reason}\n(median, 25-75 %; from where each writer has written on)"
    jobs = {
        "fig1_resid_pr.png": lambda path: fig1_resid(summary, cfg, writers, path, labels=labels, title=title, from_writer=True),
        "fig2_node_pr.png": lambda path: fig2_nodes(summary, cfg, focus, path),
        "heatmap_pr.png": lambda path: heatmap(summary, cfg, path),
    }
    made, errors = {}, {}
    for name, draw in jobs.items():
        try:
            made[name] = draw(os.path.join(out_dir, name))
        except Exception as e:  # a plot is an extra: report it, keep the rest of the report
            errors[name] = f"{type(e).__name__}: {e}"
    return made, errors
