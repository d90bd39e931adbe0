"""Ranking of a scan summary's (downstream node, writer) pairs: what the report and the CLI list first.

Pairs are ranked by the median over tokens of one statistic (`RANK_STATISTICS`, default "es", the
erasure score PR * |cos| * |w| / |x|; formulas and the measurements behind the choice in
pair_stats.py and docs/math.md), most negative first (strongest erasure). Each statistic has a null: the same statistic against a
random direction of the writer's norm. A pair is **above the null** when its median is negative and
more negative than the most negative null median of every downstream pair of the scan, which must
itself be negative -- beyond any erasure the scan's nodes show against directions nothing in the model
relates to. A threshold that is not negative (every null median positive) or undefined (no downstream
pair) gives no erasure level to beat: then no pair is above the null, and the report says why. The
threshold is fixed by that rule, not tuned.
"""

from __future__ import annotations

import math

RANK_STATISTICS = {
    "es": "erasure score ES = PR * |cos| * |w| / |x| = (a.w)|a.w| / (|a| |w|^2 |x|), x the final residual stream",
    "apr": "alignment-weighted projection ratio APR = PR * |cos| = (a.w)|a.w| / (|a| |w|^3)",
    "pr": "projection ratio PR = a.w / |w|^2 (the paper's)",
    "pv": "projection value PV = a.w / |w| (residual-stream units)",
    "cos": "cosine a.w / (|a| |w|)",
}
DEFAULT_RANK = "es"
STATISTIC_NAMES = {"es": "ES", "apr": "APR", "pr": "PR", "pv": "PV", "cos": "cos"}


def _check(by: str) -> None:
    if by not in RANK_STATISTICS:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_STATISTICS)}, got {by!r}")


def statistic_column(by: str) -> str:
    """The summary column that holds the median of statistic ``by``."""
    _check(by)
    return "median" if by == "pr" else f"{by}_median"


def null_threshold(summary, by: str = DEFAULT_RANK) -> float:
    """The most negative null median over the scan's downstream pairs (NaN when there is none)."""
    _check(by)
    pairs = summary[(summary.kind == "node") & summary.downstream]
    values = pairs[f"{by}_null_median"].dropna() if f"{by}_null_median" in pairs else []
    return float(min(values)) if len(values) else float("nan")


def above_null(medians, threshold: float):
    """Whether each median is erasure beyond the null: negative and below a negative ``threshold``;
    nothing is, when the threshold is not negative or NaN (NaN medians never are)."""
    return medians < threshold if threshold < 0 else medians < -math.inf


def null_verdict(meta: dict) -> str:
    """The ranking's outcome in words: how many pairs are above the null, or why none is."""
    threshold, n = meta["null_threshold"], meta["downstream_pairs"]
    if meta["pairs_above_null"]:
        return f"{meta['pairs_above_null']:,} of {n:,} downstream pairs above the null"
    if n == 0 or math.isnan(threshold):
        return ("no erasure above the null: no node reads these writers downstream, so nothing can erase them"
                if n == 0 else "no erasure above the null: no downstream pair has a null median (no tokens)")
    if threshold >= 0:
        return (f"no erasure above the null: the null threshold {threshold:+.4g} is not negative (the random "
                f"directions show no erasure among these {n:,} downstream pairs to measure against)")
    return f"no erasure above the null: no downstream pair's median is below the null threshold {threshold:+.4g}"


def rank_pairs(summary, by: str = DEFAULT_RANK, n: int = None):
    """Downstream (node, writer) pairs sorted by the median of ``by`` (most negative first), with
    columns ``rank_statistic`` (that median), ``null_threshold`` and ``above_null``."""
    col = statistic_column(by)
    pairs = summary[(summary.kind == "node") & summary.downstream & (summary["count"] > 0)].copy()
    threshold = null_threshold(summary, by)
    pairs["rank_statistic"] = pairs[col]
    pairs["null_threshold"] = threshold
    pairs["above_null"] = above_null(pairs[col], threshold)
    pairs = pairs.sort_values(["rank_statistic", "node", "writer"], na_position="last")
    return pairs if n is None else pairs.head(n)


def top_pairs(summary, n: int = 10, by: str = DEFAULT_RANK):
    """The ``n`` strongest downstream erasure pairs by ``by`` (see `rank_pairs`)."""
    return rank_pairs(summary, by, n)


def ranking_meta(summary, by: str = DEFAULT_RANK) -> dict:
    """What a report says about its ranking: the statistic, its formula, the null threshold and how
    many downstream pairs are above it."""
    ranked = rank_pairs(summary, by)
    return dict(rank_by=by, rank_formula=RANK_STATISTICS[by], null_threshold=null_threshold(summary, by),
                pairs_above_null=int(ranked.above_null.sum()), downstream_pairs=int(len(ranked)))


def featured_writers(summary, by: str = DEFAULT_RANK, most: int = 4):
    """The writers a report shows first, and why: those of the pairs above the null, in rank order,
    each with the nodes that erase it beyond the null; when no pair is above the null, those of the
    three top pairs (at most ``most`` writers). Returns ([(writer, [nodes])], reason in words)."""
    ranked = rank_pairs(summary, by)
    name = STATISTIC_NAMES[by]
    chosen = ranked[ranked.above_null]
    reason = f"writers of the pairs above the null by median {name}"
    if chosen.empty:
        chosen = ranked.head(3)
        reason = f"writers of the top {len(chosen)} pairs by median {name} (no pair is above the null)"
    out = {}
    for node, writer in zip(chosen.node, chosen.writer):
        if writer in out or len(out) < most:
            out.setdefault(writer, []).append(node)
    return list(out.items()), reason
