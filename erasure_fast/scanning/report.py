"""Scan report: summary.parquet / .csv / .json, paper-style PNG plots, report.md and report.html
(report_html.py)."""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional

import numpy as np

from ..optional_deps import require_optional
from ..paths import atomic_write
from .plan import CONTEXT_BEFORE
from .plots import all_plots, written
from .ranking import RANK_STATISTICS, STATISTIC_NAMES, featured_writers, null_verdict, rank_pairs, ranking_meta, statistic_column
from .report_html import write_report_html

QS = (0.125, 0.25, 0.5, 0.75, 0.875)


def _capture_text(meta: dict) -> str:
    """The scan's capture as the report reads it: "engine", "hooks" or "hooks (reason)"."""
    capture, reason = meta.get("capture", "hooks"), meta.get("capture_reason")
    return f"{capture} ({reason})" if reason else capture


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
    # the ranking statistics are kept per position bucket (their nulls are not): BOS vs the rest
    by_position = {name: (stats.summary([0], (0.5,)), stats.summary(list(range(1, stats.B)), (0.5,)))
                   for name, stats in agg.pair_stats.items() if stats.B > 1}
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
            row.update(_pair_columns(pair_summaries, by_position, pair_of.get(s) if is_node else None))
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


def _pair_columns(pair_summaries: dict, by_position: dict, k) -> dict:
    """The ranking statistics of downstream pair ``k`` (NaN for other rows): median, quartiles and
    mean of each statistic, the median of each null, then each statistic's median at BOS and at the
    other positions (``{name}_median_bos`` / ``_rest``)."""
    nan = float("nan")
    out = {}
    for name, summ in pair_summaries.items():
        keys = ("q0.5",) if name.endswith("_null") else ("q0.5", "q0.25", "q0.75", "mean")
        for key in keys:
            column = f"{name}_median" if key == "q0.5" else f"{name}_{key}"
            out[column] = nan if k is None else float(summ[key][k])
    for name, (bos, rest) in by_position.items():
        out[f"{name}_median_bos"] = nan if k is None else float(bos["q0.5"][k])
        out[f"{name}_median_rest"] = nan if k is None else float(rest["q0.5"][k])
    return out


def _stats(summary: Dict[str, np.ndarray], s: int) -> dict:
    out = {k: (int(v[s]) if k in ("count", "nan", "underflow", "overflow") else float(v[s])) for k, v in summary.items()}
    out["median"] = out.pop("q0.5")
    return out


EXAMPLE_KINDS = {
    "strongest_erasure": "positions where its output is erased most (most negative sum of downstream PR)",
    "dla_minus_adjusted": "candidate adversarial examples for DLA (largest |DLA| - |adjusted DLA|)",
}


def _top_table(top, writer_index: int) -> list:
    """The kept examples of one writer, best first, each with the ids around its position
    (``context_ids``, -1 padding dropped; the position is ``context_ids[context_at]``)."""
    out = []
    for j in range(top.k):
        if not np.isfinite(top.score[writer_index, j]):
            break
        ids = top.context[writer_index, j]
        inside = ids >= 0
        out.append(dict(row=int(top.row[writer_index, j]), pos=int(top.pos[writer_index, j]),
                        score=float(top.score[writer_index, j]),
                        sum_downstream_pr=float(top.payload[writer_index, j, 0]),
                        dla=float(top.payload[writer_index, j, 1]), adjusted_dla=float(top.payload[writer_index, j, 2]),
                        context_ids=ids[inside].tolist(), context_at=int(inside[:CONTEXT_BEFORE].sum())))
    return out


def top_examples(agg, cfg) -> Dict[str, Dict[str, list]]:
    """{writer: {kind: examples}} for every writer of the scan (`EXAMPLE_KINDS`, `_top_table`)."""
    tables = {"strongest_erasure": agg.top_erasure, "dla_minus_adjusted": agg.top_adversarial}
    return {w: {kind: _top_table(tables[kind], i) for kind in EXAMPLE_KINDS} for i, w in enumerate(cfg.writer_labels)}


def token_texts(tokenizer, ids) -> Optional[Dict[int, str]]:
    """{id: its text} for ``ids``, each token decoded on its own by ``tokenizer``; None without a
    tokenizer (the report then shows ids). An id the tokenizer cannot decode (a model vocabulary
    padded beyond the tokenizer's) is left out and shown as its id."""
    if tokenizer is None:
        return None
    out = {}
    for i in sorted(set(int(i) for i in ids)):
        try:
            out[i] = tokenizer.decode([i])
        except (IndexError, KeyError, OverflowError, TypeError, ValueError):
            pass
    return out


def example_ids(tops: Dict[str, Dict[str, list]]):
    """Every token id of every example's context."""
    return [i for kinds in tops.values() for examples in kinds.values() for e in examples for i in e["context_ids"]]


def write_report(out_dir: str, summary, agg, cfg, meta: dict, make_plots: bool = True, tokenizer=None) -> Dict[str, str]:
    """summary.parquet / .csv / .json, the plots, report.md and report.html in ``out_dir``, pairs
    ranked as ``meta`` says (`ranking.ranking_meta`; default statistic when absent); ``tokenizer``
    decodes the examples' token contexts (ids without one). A plot that fails is reported (warning,
    ``meta["plot_errors"]``, a line in report.md) and the rest is still written."""
    if "rank_by" not in meta:
        meta = dict(meta, **ranking_meta(summary))
    rank_by = meta["rank_by"]
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    require_optional("pyarrow", "scan", "the scan's summary.parquet")
    files["summary.parquet"] = atomic_write(os.path.join(out_dir, "summary.parquet"), lambda p: summary.to_parquet(p, index=False))
    files["summary.csv"] = atomic_write(os.path.join(out_dir, "summary.csv"), lambda p: summary.to_csv(p, index=False))
    pairs = rank_pairs(summary, rank_by, 15)
    focus = pairs.writer.iloc[0] if len(pairs) else cfg.writer_labels[0]
    tops = top_examples(agg, cfg)
    texts = token_texts(tokenizer, example_ids(tops))
    if texts is not None:
        for kinds in tops.values():
            for examples in kinds.values():
                for e in examples:
                    e["context_tokens"] = [texts.get(i) for i in e["context_ids"]]
    plot_errors: Dict[str, str] = {}
    if make_plots:
        made, plot_errors = all_plots(out_dir, summary, cfg, focus, rank_by)
        files.update(made)
        for name, err in plot_errors.items():
            warnings.warn(f"erasure_fast scan report: plot {name} failed ({err}); the rest of the report is written",
                          stacklevel=2)
    meta = dict(meta, plot_errors=plot_errors)
    # top_examples: the focus writer's (what `erasure_fast.paper.mine_adversarial` reads); every writer's beside it
    payload = dict(meta=meta, focus_writer=focus, top_examples=tops[focus], top_examples_by_writer=tops,
                   rows=json.loads(summary.to_json(orient="records")))

    def dump_json(path):
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)

    files["summary.json"] = atomic_write(os.path.join(out_dir, "summary.json"), dump_json)
    files["report.html"] = write_report_html(os.path.join(out_dir, "report.html"), summary, agg, cfg, meta, tops, texts)
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
    others = [s for s in RANK_STATISTICS if s != by]  # each statistic once: the ranked one leads
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
        f"| node | writer | median {name} | 25 % | 75 % | null median | above null | "
        + " | ".join(f"median {STATISTIC_NAMES[s]}" for s in others) + " | PR at BOS | PR elsewhere | tokens |",
        "|---" * (10 + len(others)) + "|",
    ]
    q = "q0.25" if by == "pr" else f"{by}_q0.25"
    q3 = "q0.75" if by == "pr" else f"{by}_q0.75"
    for _, r in pairs.iterrows():
        lines.append(f"| {r.node} | {r.writer} | {_fmt(r['rank_statistic'])} | {_fmt(r[q])} | {_fmt(r[q3])} | "
                     f"{_fmt(r[f'{by}_null_median'])} | {'yes' if r['above_null'] else 'no'} | "
                     + " | ".join(_fmt(r[statistic_column(s)]) for s in others)
                     + f" | {_fmt(r['median_bos'])} | {_fmt(r['median_rest'])} | {int(r['count']):,} |")
    return lines


def _visible(text: str) -> str:
    """A token's text with its whitespace shown (a newline as a mark, not a line break)."""
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def _md_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\`*_[]<>|#" else c for c in text)


def context_markdown(example: dict) -> str:
    """An example's context as one markdown table cell: the tokens before the position, the position
    in [ ], then -> and the tokens after (its next-token target first); text when the example has
    decoded tokens, ids otherwise."""
    ids, at = example["context_ids"], example["context_at"]
    texts = example.get("context_tokens")
    if texts is None:
        pieces, sep = [str(i) for i in ids], " "
    else:
        pieces, sep = [_md_escape(_visible(t)) if t is not None else f"&lt;{i}&gt;" for i, t in zip(ids, texts)], ""
    return f"{sep.join(pieces[:at])}{sep}[{pieces[at]}]{sep}\u2192 {sep.join(pieces[at + 1:])}".strip()


def _examples_section(tops, featured, reason) -> list:
    k = max((len(e) for kinds in tops.values() for e in kinds.values()), default=0)
    decoded = any("context_tokens" in e for kinds in tops.values() for es in kinds.values() for e in es)
    lines = ["", "## Top examples in context", "",
             f"Every writer keeps its top {k} positions of each kind (`--top-k`); shown here, 10 each, for the {reason} "
             f"({', '.join(w for w, _ in featured)}); report.html and summary.json hold every writer's. Context: the "
             "tokens the model read around the position, the position in [ ], then \u2192 and its next-token target "
             + ("(each token decoded on its own)." if decoded else "(token ids: no tokenizer).")]
    for writer, _ in featured:
        for kind, what in EXAMPLE_KINDS.items():
            lines += ["", f"### {writer}: {what}", "", "| row | pos | sum downstream PR | DLA | adjusted DLA | context |",
                      "|---|---|---|---|---|---|"]
            for e in tops[writer][kind][:10]:
                lines.append(f"| {e['row']} | {e['pos']} | {_fmt(e['sum_downstream_pr'])} | {_fmt(e['dla'])} | "
                             f"{_fmt(e['adjusted_dla'])} | {context_markdown(e)} |")
    return lines


def _resid_section(summary, cfg, featured, reason) -> list:
    writers = [w for w, _ in featured]
    lines = ["", "## Residual stream PR onto the featured writers", "",
             f"The {reason}: median [25 %, 75 %] of the residual stream's PR onto each, from the point where the "
             "writer has written on (- before).", "",
             "| point | " + " | ".join(writers) + " |", "|---" * (len(writers) + 1) + "|"]
    cells = {}
    for w in writers:
        r = summary[(summary.kind == "resid") & (summary.writer == w)].set_index("node").loc[cfg.resid_labels]
        cells[w] = [f"{_fmt(m)} [{_fmt(a)}, {_fmt(b)}]" if ok else "-"
                    for m, a, b, ok in zip(r["median"], r["q0.25"], r["q0.75"], written(cfg.resid_labels, w))]
    for i, point in enumerate(cfg.resid_labels):
        lines.append(f"| {point} | " + " | ".join(cells[w][i] for w in writers) + " |")
    return lines


def _markdown(summary, pairs, tops, cfg, meta, focus, files) -> str:
    lines = ["# Erasure scan report", ""]
    if meta.get("notes"):
        lines += [f"> {meta['notes']}", ""]
    tps = meta.get("tokens_per_s")
    width = (meta['pr_hist']['hi'] - meta['pr_hist']['lo']) / meta['pr_hist']['bins']
    lines += [
        f"- model: {meta['model']} (fingerprint {meta['model_fingerprint']})",
        f"- corpus: {meta['corpus']['source']} (rows of {meta['seq_len']} tokens, BOS prepended: {meta['prepend_bos'] is not None}"
        + (f"; {meta['corpus']['dropped_tokens']:,} tokens in no whole row, not scanned" if meta['corpus'].get('dropped_tokens') else "")
        + f"; token hash {meta['corpus'].get('content_hash', 'n/a')})",
        f"- tokens: {meta['tokens']:,} in {meta['rows']:,} rows; backend {meta['backend']}; capture {_capture_text(meta)}; "
        f"{meta['world_size']} process(es)",
        f"- time: {meta['elapsed_s']:.1f} s ({tps:,.0f} tokens/s)" if tps else "- time: n/a",
        f"- quantiles from fixed-bin histograms: PR bins of {width:g} centred on its multiples, over "
        f"[{meta['pr_hist']['lo']:g}, {meta['pr_hist']['hi']:g}] (quantile error <= one bin; values outside are counted "
        "as under/overflow); each is within one bin of the exact percentile the paper analyses report "
        "(`erasure_fast.paper`: median = mean of the two middle values, band 12.5-87.5 %)",
        "- the interactive report: report.html (one self-contained file; `erasure-fast view` opens it)",
        "",
    ]
    lines += _ranking_section(pairs, meta)
    featured, reason = featured_writers(summary, meta["rank_by"])
    if not featured:  # no downstream pair at all: the writers themselves
        featured, reason = [(w, []) for w in cfg.writer_labels[:3]], "first writers (no downstream pair)"
    lines += _resid_section(summary, cfg, featured, reason)
    lines += _examples_section(tops, featured, reason)
    pngs = [k for k in files if k.endswith(".png")]
    if pngs or meta.get("plot_errors"):
        lines += ["", "## Plots", ""]
        for k in sorted(pngs):
            lines.append(f"![{k}]({k})")
        for k, err in sorted(meta.get("plot_errors", {}).items()):
            lines.append(f"- {k}: not drawn ({err})")
    lines += ["", "Files: " + ", ".join(sorted(k for k in files)) + ", report.md", ""]
    return "\n".join(lines)
