"""report.html: a scan's report as one interactive, self-contained page (`erasure_fast.webpage`).

Everything it shows is computed here from the scan's aggregates and summary and embedded as JSON; its
script (webpage/scan_report.js, hand-written SVG, no library) only sorts, filters and draws:

- the ranked downstream (node, writer) pairs with every statistic's median and null median, whether
  each is above the null (`ranking.above_null`, per statistic);
- per pair and statistic, the distribution by position bucket: the histogram's counts merged into at
  most `DISPLAY_BINS` bins over the range that holds 99 % of the pair's tokens (tokens outside it are
  counted), and count, mean and quantiles per bucket, for all positions but BOS and for all;
- residual-stream PR per writer (fig 1's numbers), from where the writer has written on;
- every writer's top examples with the token ids around the position (and their text, decoded one token
  at a time, when there is a tokenizer);
- the run's metadata.

Sizes are bounded whatever the scan: distributions for at most `DIST_PAIRS` pairs (the strongest by the
scan's ranking statistic; all of them in the demo), at most `PAGE_EXAMPLES` examples per writer and
kind (summary.json holds all); the page says when it shows fewer.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from ..version import __version__
from ..webpage import asset, page, write_page
from .plots import node_order, written
from .ranking import (RANK_STATISTICS, STATISTIC_NAMES, above_null, featured_writers, null_verdict, rank_pairs,
                      ranking_meta, statistic_column)

DISPLAY_BINS = 40  # bars per histogram in the page
DIST_PAIRS = 1000  # pairs whose distributions the page embeds
PAGE_EXAMPLES = 50  # examples per writer and kind in the page
QUANTILES = (0.125, 0.25, 0.5, 0.75, 0.875)
_SIGNIFICANT = 5  # digits kept of every float in the page (its statistics are shown to their bins' resolution)


def _number(x):
    """A JSON-safe float: NaN -> None, +-inf -> "inf" / "-inf", else rounded to _SIGNIFICANT digits."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.{_SIGNIFICANT}g}")


def _numbers(values) -> list:
    return [_number(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _column(by: str, key: str) -> str:
    """The summary column of statistic ``by``'s ``key`` (q0.25, q0.75, mean, null_median)."""
    if key == "null_median":
        return f"{by}_null_median"
    return key if by == "pr" else f"{by}_{key}"


def _display_histogram(hist: np.ndarray, lo: float, width: float):
    """hist [B, n_bins + 2] (underflow, bins, overflow) of one series -> (display lo, display width,
    counts [B, <= DISPLAY_BINS], below [B], above [B]), or None without values: whole fine bins
    merged into display bins over the range that holds the middle 99 % of every bucket's tokens (a
    bucket as small as BOS keeps its own place in it); below / above count the rest."""
    firsts, lasts = [], []
    for h in hist:
        n = int(h.sum())
        if n:
            cum = np.cumsum(h)
            firsts.append(int(np.searchsorted(cum, 0.005 * n, side="right")))  # fine bin index (0 = underflow)
            lasts.append(int(np.searchsorted(cum, 0.995 * n, side="left")))
    if not firsts:
        return None
    inner = hist.shape[1] - 2
    first, last = min(max(min(firsts), 1), inner), max(min(max(lasts), inner), 1)
    first = min(first, last)  # everything under- or overflowed: one bar at the edge
    group = -(-(last - first + 1) // DISPLAY_BINS)
    edges = np.minimum(np.arange(first, last + 1 + group, group), inner + 1)
    cums = np.concatenate([np.zeros((hist.shape[0], 1), hist.dtype), np.cumsum(hist, axis=1)], axis=1)
    counts = cums[:, edges[1:]] - cums[:, edges[:-1]]
    below = cums[:, first]
    above = cums[:, -1] - cums[:, edges[-1]]
    return lo + (first - 1) * width, group * width, counts, below, above


def _quantile_rows(stats, series: np.ndarray) -> list:
    """[series][bucket..., rest, all][count, mean, q12.5, q25, q50, q75, q87.5] of ``stats``
    (SeriesStats) for ``series``; "rest" is every bucket but the first (BOS)."""
    groups = [[b] for b in range(stats.B)] + [list(range(1, stats.B)), None]
    tables = []
    for g in groups:
        if g == []:  # one bucket only: no rest
            tables.append(None)
            continue
        s = stats.summary(g, QUANTILES)
        tables.append(np.stack([s["count"], s["mean"]] + [s[f"q{q:g}"] for q in QUANTILES], axis=1)[series])
    return [[None if t is None else [int(t[i][0])] + _numbers(t[i][1:]) for t in tables] for i in range(len(series))]


def _distributions(agg, cfg, chosen: np.ndarray) -> Dict[str, dict]:
    """Per statistic: display histograms and quantile tables of the pairs ``chosen`` (pair indices,
    `Aggregates.pair_index` order); PR from the PR histograms, the others from the ranking statistics'."""
    flat = agg.pair_index.numpy()[chosen]  # (node, writer) series of the PR histograms
    sources = {name: (agg.pair_stats[name], chosen) for name in RANK_STATISTICS if name != "pr"}
    sources["pr"] = (agg.pr, flat)
    out = {}
    for name, (stats, series) in sources.items():
        hist = stats.hist
        entry = dict(lo=[], width=[], counts=[], below=[], above=[], q=_quantile_rows(stats, series))
        for s in series:
            shown = _display_histogram(hist[:, s, :], stats.lo, stats.bin_width)
            if shown is None:
                for key in ("lo", "width", "counts", "below", "above"):
                    entry[key].append(None)
                continue
            lo, width, counts, below, above = shown
            entry["lo"].append(_number(lo))
            entry["width"].append(_number(width))
            entry["counts"].append(counts.tolist())
            entry["below"].append(below.tolist())
            entry["above"].append(above.tolist())
        out[name] = entry
    return out


def _bucket_names(edges) -> list:
    names = ["BOS (0)"]
    bounds = list(edges) + [None]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        names.append(f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}\u2013{hi - 1}"))
    return names


def report_data(summary, agg, cfg, meta: dict, tops: Dict[str, Dict[str, list]], texts: Optional[Dict[int, str]]) -> dict:
    """Everything report.html shows, as JSON-safe lists and dicts (see the module docstring)."""
    W = len(cfg.writer_labels)
    flat = agg.pair_index.numpy()
    rows = summary.iloc[flat]  # summary rows are node-major: row node * W + writer is that pair
    assert list(rows.node) == [cfg.node_labels[s // W] for s in flat] and list(rows.writer) == [cfg.writer_labels[s % W] for s in flat]
    pairs = dict(node=[cfg.node_labels.index(n) for n in rows.node], writer=[cfg.writer_labels.index(w) for w in rows.writer],
                 count=rows["count"].astype(int).tolist(), pr_bos=_numbers(rows["median_bos"]),
                 pr_rest=_numbers(rows["median_rest"]))
    position = {(n, w): k for k, (n, w) in enumerate(zip(rows.node, rows.writer))}
    ranking = {}
    for by in RANK_STATISTICS:
        by_meta = ranking_meta(summary, by)
        ranked = rank_pairs(summary, by)
        medians = rows[statistic_column(by)].to_numpy(dtype=float)
        pairs[by] = {key: _numbers(rows[_column(by, key)]) for key in ("q0.25", "q0.75", "mean", "null_median")}
        pairs[by]["median"] = _numbers(medians)
        pairs[by]["above"] = [bool(a) for a in above_null(medians, by_meta["null_threshold"])]
        # the scan's own order (full precision, its tie-break): the page sorts a statistic's medians by it
        ranking[by] = dict(threshold=_number(by_meta["null_threshold"]), verdict=null_verdict(by_meta),
                           formula=RANK_STATISTICS[by], above=by_meta["pairs_above_null"],
                           order=[position[(n, w)] for n, w in zip(ranked.node, ranked.writer)])
    # distributions of the strongest pairs by the scan's statistic (every pair when there are few)
    strongest = ranking[meta["rank_by"]]["order"]
    ranked = set(strongest)
    chosen = np.array(sorted((strongest + [k for k in range(len(flat)) if k not in ranked])[:DIST_PAIRS]), dtype=np.int64)
    featured, reason = featured_writers(summary, meta["rank_by"])
    resid = {}
    for w in cfg.writer_labels:
        r = summary[(summary.kind == "resid") & (summary.writer == w)].set_index("node").loc[cfg.resid_labels]
        resid[w] = dict(written=written(cfg.resid_labels, w).tolist(),
                        **{k: _numbers(r[k]) for k in ("median", "q0.125", "q0.25", "q0.75", "q0.875")})
    kept = max((len(e) for kinds in tops.values() for e in kinds.values()), default=0)
    examples = {w: {kind: [dict(e, **{k: _number(e[k]) for k in ("score", "sum_downstream_pr", "dla", "adjusted_dla")})
                           for e in shown[:PAGE_EXAMPLES]] for kind, shown in kinds.items()} for w, kinds in tops.items()}
    for kinds in examples.values():
        for shown in kinds.values():
            for e in shown:
                e.pop("context_tokens", None)  # the page decodes through `vocab`, once per id
    shown_ids = {i for kinds in examples.values() for shown in kinds.values() for e in shown for i in e["context_ids"]}
    page_meta = {k: v for k, v in meta.items() if k not in ("writers",)}
    widths = {name: stats.bin_width for name, stats in agg.pair_stats.items()}
    widths["pr"] = agg.pr.bin_width
    decimals = {by: max(0, math.ceil(-math.log10(widths[by]) - 1e-9)) for by in RANK_STATISTICS}
    return dict(
        version=__version__, meta=_json_safe(page_meta), rank_by=meta["rank_by"], stats=list(RANK_STATISTICS),
        stat_names=dict(STATISTIC_NAMES), decimals=decimals, ranking=ranking, nodes=list(cfg.node_labels), writers=list(cfg.writer_labels),
        node_order=sorted(range(len(cfg.node_labels)), key=lambda i: node_order(cfg.node_labels[i])),
        buckets=_bucket_names(cfg.position_edges), pairs=pairs, dist_pairs=chosen.tolist(),
        dist=_distributions(agg, cfg, chosen), resid_points=list(cfg.resid_labels), resid=resid,
        featured=[dict(writer=w, nodes=n) for w, n in featured], featured_reason=reason,
        examples=examples, examples_kept=kept, examples_shown=min(kept, PAGE_EXAMPLES),
        vocab=None if texts is None else {str(i): texts[i] for i in sorted(shown_ids) if i in texts})


def _json_safe(value):
    """``value`` with numpy scalars as Python numbers and NaN / inf as `_number` writes them."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _number(value) if not math.isfinite(value) else float(value)
    return value


def write_report_html(path: str, summary, agg, cfg, meta: dict, tops, texts) -> str:
    """Write report.html (`report_data` embedded in the page) to ``path``; returns ``path``."""
    data = report_data(summary, agg, cfg, meta, tops, texts)
    body = ('<div id="app"><p class="loading">Loading the report&hellip; (it needs JavaScript; report.md beside this '
            "file has the same tables)</p></div>")
    title = f"Erasure scan: {meta.get('model')} ({meta.get('tokens', 0):,} tokens)"
    return write_page(path, page(title, body, data=data, scripts=[asset("scan_report.js")], styles=[asset("scan_report.css")]))
