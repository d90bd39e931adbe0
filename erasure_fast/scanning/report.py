"""Scan report: summary.parquet / .csv / .json, paper-style PNG plots, report.md."""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict

import numpy as np

from ..paths import atomic_write
from .plots import all_plots
from .ranking import STATISTIC_NAMES, null_verdict, rank_pairs, ranking_meta

QS = (0.125, 0.25, 0.5, 0.75, 0.875)


def _bucket_names(edges) -> list:
    names = ["pos0"]
    bounds = list(edges) + [None]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        names.append(f"pos{lo}+" if hi is None else f"pos{lo}-{hi - 1}")
    return names


def summarize(agg, cfg):
    """One row per (node, writer), (resid point, writer), head DLA and writer adjusted DLA."""
    import pandas as pd

    W = len(cfg.writers)
    all_ = agg.pr.summary(None, QS)
    bos = agg.pr.summary([0], (0.5,))
    rest = agg.pr.summary(list(range(1, agg.n_buckets)), (0.5,))
    per_bucket = [agg.pr.summary([b], (0.5,)) for b in range(agg.n_buckets)]
    bnames = _bucket_names(cfg.position_edges)
    n_nodes = len(cfg.node_labels)
    pair_of = {int(s): k for k, s in enumerate(agg.pair_index.tolist())}  # flat (node, writer) -> ranked pair
    pair_summaries = {name: stats.summary(None, (0.25, 0.5, 0.75)) for name, stats in agg.pair_stats.items()}
    rows = []
    labels = cfg.node_labels + cfg.resid_labels
    for i, label in enumerate(labels):
        is_node = i < n_nodes
        for w in range(W):
            s = i * W + w
            downstream = s in pair_of  # the ranked pairs are exactly the downstream ones (state.downstream_pairs)
            row = dict(kind="node" if is_node else "resid", node=label, writer=cfg.writer_labels[w], downstream=bool(downstream))
            row.update(_stats(all_, s))
            row["median_bos"] = bos["q0.5"][s]
            row["median_rest"] = rest["q0.5"][s]
            for b, name in enumerate(bnames):
                row[f"median_{name}"] = per_bucket[b]["q0.5"][s]
            row.update(_pair_columns(pair_summaries, pair_of.get(s) if is_node else None))
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


def _pair_columns(pair_summaries: dict, k) -> dict:
    """The ranking statistics of downstream pair ``k`` (NaN for other rows): median, quartiles and
    mean of each statistic, the median of each null."""
    out = {}
    for name, summ in pair_summaries.items():
        keys = ("q0.5",) if name.endswith("_null") else ("q0.5", "q0.25", "q0.75", "mean")
        for key in keys:
            column = f"{name}_median" if key == "q0.5" else f"{name}_{key}"
            out[column] = float("nan") if k is None else float(summ[key][k])
    return out


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


def write_report(out_dir: str, summary, agg, cfg, meta: dict, make_plots: bool = True) -> Dict[str, str]:
    """summary.parquet / .csv / .json, the plots and report.md in ``out_dir``, pairs ranked as
    ``meta`` says (`ranking.ranking_meta`; default statistic when absent). A plot that fails is
    reported (warning, ``meta["plot_errors"]``, a line in report.md) and the rest is still written."""
    if "rank_by" not in meta:
        meta = dict(meta, **ranking_meta(summary))
    rank_by = meta["rank_by"]
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    files["summary.parquet"] = atomic_write(os.path.join(out_dir, "summary.parquet"), lambda p: summary.to_parquet(p, index=False))
    files["summary.csv"] = atomic_write(os.path.join(out_dir, "summary.csv"), lambda p: summary.to_csv(p, index=False))
    pairs = rank_pairs(summary, rank_by, 15)
    focus = pairs.writer.iloc[0] if len(pairs) else cfg.writer_labels[0]
    wi = cfg.writer_labels.index(focus)
    tops = {
        "strongest_erasure": _top_table(agg.top_erasure, cfg, wi),
        "dla_minus_adjusted": _top_table(agg.top_adversarial, cfg, wi),
    }
    plot_errors: Dict[str, str] = {}
    if make_plots:
        made, plot_errors = all_plots(out_dir, summary, cfg, focus, rank_by)
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

    files["summary.json"] = atomic_write(os.path.join(out_dir, "summary.json"), dump_json)
    md = _markdown(summary, pairs, tops, cfg, meta, focus, files)

    def dump_md(path):
        with open(path, "w") as f:
            f.write(md)

    files["report.md"] = atomic_write(os.path.join(out_dir, "report.md"), dump_md)
    return files


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def _ranking_section(pairs, meta) -> list:
    by, threshold = meta["rank_by"], meta["null_threshold"]
    name = STATISTIC_NAMES[by]
    lines = [
        f"## Strongest erasure: downstream (node, writer) pairs by median {name}",
        "",
        f"Ranked by the median over tokens of the {meta['rank_formula']} (a = node output, w = writer output; "
        "most negative = strongest erasure; `--rank-by` / `rank_by=` picks another statistic, and summary.* has "
        "every statistic as a column). **Null**: the same statistic against a random direction of the writer's "
        f"norm; a pair is above the null when its median is negative and below the most negative null median of "
        f"all {meta['downstream_pairs']:,} downstream pairs ({'none' if np.isnan(threshold) else _fmt(threshold)}), "
        "which must itself be negative.",
        "",
    ]
    verdict = null_verdict(meta)
    lines += [f"**{verdict[0].upper()}{verdict[1:]}.**" if not meta["pairs_above_null"] else f"{verdict}.", ""]
    lines += [
        f"| node | writer | median {name} | 25 % | 75 % | null median | above null | median PR | median cos | median PV | "
        "median ES | PR at BOS | PR elsewhere | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    q = "q0.25" if by == "pr" else f"{by}_q0.25"
    q3 = "q0.75" if by == "pr" else f"{by}_q0.75"
    for _, r in pairs.iterrows():
        lines.append(f"| {r.node} | {r.writer} | {_fmt(r['rank_statistic'])} | {_fmt(r[q])} | {_fmt(r[q3])} | "
                     f"{_fmt(r[f'{by}_null_median'])} | {'yes' if r['above_null'] else 'no'} | {_fmt(r['median'])} | "
                     f"{_fmt(r['cos_median'])} | {_fmt(r['pv_median'])} | {_fmt(r['es_median'])} | {_fmt(r['median_bos'])} | "
                     f"{_fmt(r['median_rest'])} | {int(r['count']):,} |")
    return lines


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
        f"- tokens: {meta['tokens']:,} in {meta['rows']:,} rows; backend {meta['backend']}; capture {meta.get('capture', 'hooks')}; "
        f"{meta['world_size']} process(es)",
        f"- time: {meta['elapsed_s']:.1f} s ({tps:,.0f} tokens/s)" if tps else "- time: n/a",
        f"- quantiles from fixed-bin histograms: PR bins of {(meta['pr_hist']['hi'] - meta['pr_hist']['lo']) / meta['pr_hist']['bins']:g} "
        f"over [{meta['pr_hist']['lo']}, {meta['pr_hist']['hi']}] (quantile error <= one bin; values outside are counted as under/overflow); "
        "each is within one bin of the exact percentile the paper analyses report (`erasure_fast.paper`: median = mean of the "
        "two middle values, band 12.5-87.5 %)",
        "",
    ]
    lines += _ranking_section(pairs, meta)
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
