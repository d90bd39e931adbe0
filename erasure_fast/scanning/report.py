"""Scan report: summary.parquet / .csv / .json, paper-style PNG plots, report.md."""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict

import numpy as np

from .plots import all_plots
from .ranking import top_pairs

QS = (0.125, 0.25, 0.5, 0.75, 0.875)


def _bucket_names(edges) -> list:
    names = ["pos0"]
    bounds = list(edges) + [None]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        names.append(f"pos{lo}+" if hi is None else f"pos{lo}-{hi - 1}")
    return names


def summarize(agg, cfg, spec):
    """One row per (node, writer), (resid point, writer), head DLA and writer adjusted DLA."""
    import pandas as pd

    W = len(cfg.writers)
    all_ = agg.pr.summary(None, QS)
    bos = agg.pr.summary([0], (0.5,))
    rest = agg.pr.summary(list(range(1, agg.n_buckets)), (0.5,))
    per_bucket = [agg.pr.summary([b], (0.5,)) for b in range(agg.n_buckets)]
    bnames = _bucket_names(cfg.position_edges)
    n_nodes = len(cfg.node_labels)
    L, H = spec.n_layers, spec.n_heads
    rows = []
    labels = cfg.node_labels + cfg.resid_labels
    for i, label in enumerate(labels):
        is_node = i < n_nodes
        for w in range(W):
            s = i * W + w
            wl = int(cfg.writers[w]) // H
            if is_node:
                node_layer = i // H if i < L * H else i - L * H
                downstream = (node_layer > wl) if i < L * H else (node_layer >= wl)
            else:
                downstream = False
            row = dict(kind="node" if is_node else "resid", node=label, writer=cfg.writer_labels[w], downstream=bool(downstream))
            row.update(_stats(all_, s))
            row["median_bos"] = bos["q0.5"][s]
            row["median_rest"] = rest["q0.5"][s]
            for b, name in enumerate(bnames):
                row[f"median_{name}"] = per_bucket[b]["q0.5"][s]
            rows.append(row)
    dla = agg.dla.summary(None, QS)
    dla_bos = agg.dla.summary([0], (0.5,))
    dla_rest = agg.dla.summary(list(range(1, agg.n_buckets)), (0.5,))
    for i, label in enumerate(cfg.head_labels + cfg.writer_labels):
        is_head = i < len(cfg.head_labels)
        row = dict(kind="dla" if is_head else "adjusted_dla", node=label, writer=None if is_head else label, downstream=False)
        row.update(_stats(dla, i))
        row["median_bos"] = dla_bos["q0.5"][i]
        row["median_rest"] = dla_rest["q0.5"][i]
        rows.append(row)
    return pd.DataFrame(rows)


def _stats(summary: Dict[str, np.ndarray], s: int) -> dict:
    out = {k: (int(v[s]) if k in ("count", "nan", "underflow", "overflow") else float(v[s])) for k, v in summary.items()}
    out["median"] = out.pop("q0.5")
    return out


def _top_table(top, cfg, writer_index: int, corpus_rows=None) -> list:
    out = []
    for j in range(top.k):
        if not np.isfinite(top.score[writer_index, j]):
            break
        out.append(dict(row=int(top.row[writer_index, j]), pos=int(top.pos[writer_index, j]),
                        score=float(top.score[writer_index, j]),
                        sum_downstream_pr=float(top.payload[writer_index, j, 0]),
                        dla=float(top.payload[writer_index, j, 1]), adjusted_dla=float(top.payload[writer_index, j, 2])))
    return out


def _atomic(path: str, write) -> str:
    """Call ``write(tmp_path)`` and rename the result to ``path``: readers see the old file or the new
    one, never half of one."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_report(out_dir: str, summary, agg, cfg, meta: dict, make_plots: bool = True) -> Dict[str, str]:
    """summary.parquet / .csv / .json, the plots and report.md in ``out_dir``. A plot that fails is
    reported (warning, ``meta["plot_errors"]``, a line in report.md) and the rest is still written."""
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    files["summary.parquet"] = _atomic(os.path.join(out_dir, "summary.parquet"), lambda p: summary.to_parquet(p, index=False))
    files["summary.csv"] = _atomic(os.path.join(out_dir, "summary.csv"), lambda p: summary.to_csv(p, index=False))
    pairs = top_pairs(summary, 15)
    focus = pairs.writer.iloc[0] if len(pairs) else cfg.writer_labels[0]
    wi = cfg.writer_labels.index(focus)
    tops = {
        "strongest_erasure": _top_table(agg.top_erasure, cfg, wi),
        "dla_minus_adjusted": _top_table(agg.top_adversarial, cfg, wi),
    }
    plot_errors: Dict[str, str] = {}
    if make_plots:
        made, plot_errors = all_plots(out_dir, summary, cfg, focus)
        files.update(made)
        for name, err in plot_errors.items():
            warnings.warn(f"erasure_fast scan report: plot {name} failed ({err}); the rest of the report is written",
                          stacklevel=2)
    meta = dict(meta, plot_errors=plot_errors)
    payload = dict(meta=meta, focus_writer=focus, top_examples=tops,
                   rows=json.loads(summary.to_json(orient="records")))

    def dump_json(path):
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)

    files["summary.json"] = _atomic(os.path.join(out_dir, "summary.json"), dump_json)
    md = _markdown(summary, pairs, tops, cfg, meta, focus, files)

    def dump_md(path):
        with open(path, "w") as f:
            f.write(md)

    files["report.md"] = _atomic(os.path.join(out_dir, "report.md"), dump_md)
    return files


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def _markdown(summary, pairs, tops, cfg, meta, focus, files) -> str:
    lines = ["# Erasure scan report", ""]
    if meta.get("notes"):
        lines += [f"> {meta['notes']}", ""]
    tps = meta.get("tokens_per_s")
    lines += [
        f"- model: {meta['model']} (fingerprint {meta['model_fingerprint']})",
        f"- corpus: {meta['corpus']['source']} (rows of {meta['seq_len']} tokens, BOS prepended: {meta['prepend_bos'] is not None}"
        + (f"; {meta['corpus']['dropped_tokens']:,} tokens in no whole row, not scanned" if meta['corpus'].get('dropped_tokens') else "")
        + f"; token hash {meta['corpus'].get('content_hash', 'n/a')})",
        f"- tokens: {meta['tokens']:,} in {meta['rows']:,} rows; backend {meta['backend']}; {meta['world_size']} process(es)",
        f"- time: {meta['elapsed_s']:.1f} s ({tps:,.0f} tokens/s)" if tps else "- time: n/a",
        f"- quantiles from fixed-bin histograms: PR bins of {(meta['pr_hist']['hi'] - meta['pr_hist']['lo']) / meta['pr_hist']['bins']:g} "
        f"over [{meta['pr_hist']['lo']}, {meta['pr_hist']['hi']}] (quantile error <= one bin; values outside are counted as under/overflow)",
        "",
        "## Strongest erasure: downstream (node, writer) pairs by median projection ratio",
        "",
        "| node | writer | median PR | 25 % | 75 % | mean | median at BOS | median elsewhere | tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in pairs.iterrows():
        lines.append(f"| {r.node} | {r.writer} | {_fmt(r['median'])} | {_fmt(r['q0.25'])} | {_fmt(r['q0.75'])} | "
                     f"{_fmt(r['mean'])} | {_fmt(r['median_bos'])} | {_fmt(r['median_rest'])} | {int(r['count']):,} |")
    resid = summary[(summary.kind == "resid") & (summary.writer == focus)]
    lines += ["", f"## Residual stream PR onto {focus}", "", "| point | median | 25 % | 75 % |", "|---|---|---|---|"]
    for _, r in resid.iterrows():
        lines.append(f"| {r.node} | {_fmt(r['median'])} | {_fmt(r['q0.25'])} | {_fmt(r['q0.75'])} |")
    for key, title in (("strongest_erasure", f"Positions where {focus}'s output is erased most (most negative sum of downstream PR)"),
                       ("dla_minus_adjusted", f"Candidate adversarial examples for DLA: largest |DLA| - |adjusted DLA| of {focus}")):
        lines += ["", f"## {title}", "", "| row | pos | sum downstream PR | DLA | adjusted DLA |", "|---|---|---|---|---|"]
        for e in tops[key][:10]:
            lines.append(f"| {e['row']} | {e['pos']} | {_fmt(e['sum_downstream_pr'])} | {_fmt(e['dla'])} | {_fmt(e['adjusted_dla'])} |")
    pngs = [k for k in files if k.endswith(".png")]
    if pngs or meta.get("plot_errors"):
        lines += ["", "## Plots", ""]
        for k in sorted(pngs):
            lines.append(f"![{k}]({k})")
        for k, err in sorted(meta.get("plot_errors", {}).items()):
            lines.append(f"- {k}: not drawn ({err})")
    lines += ["", "Files: " + ", ".join(sorted(k for k in files)) + ", report.md", ""]
    return "\n".join(lines)
