"""Ranking of a scan summary's (downstream node, writer) pairs: what the report and the CLI list first."""

from __future__ import annotations


def top_pairs(summary, n: int = 10):
    """Downstream (node, writer) pairs with the most negative median PR (strongest erasure)."""
    pairs = summary[(summary.kind == "node") & summary.downstream & (summary["count"] > 0)]
    return pairs.sort_values(["median", "node", "writer"]).head(n)
