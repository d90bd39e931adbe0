"""The adversarial-example miner: a scan's positions with the largest |DLA_w| - |adjusted DLA_w|,
shown in context and re-checked with the causal patch."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch

from .causal import causal_check
from .common import DEFAULT_ERASERS


def mine_adversarial(model, scan_result, corpus, *, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS,
                     top: int = 10, context: int = 12, recheck: int = 3):
    """Rank the scan's candidate positions by |DLA_w| - |adjusted DLA_w| (from its top-k), show their
    context (decoded with the model's tokenizer when it has one), and re-check the best ``recheck``
    with the causal patch (the erasers' PR onto the writer before / after). ``scan_result``: a
    ScanResult or scan output directory whose focus writer is ``writer``; ``corpus``: the scanned
    corpus. Returns a DataFrame."""
    import pandas as pd

    from ..scanning import open_corpus

    path = scan_result if isinstance(scan_result, (str, os.PathLike)) else scan_result.out_dir
    data = json.load(open(os.path.join(path, "summary.json")))
    if data["focus_writer"] != writer:
        raise ValueError(f"the scan's top examples are for {data['focus_writer']}, not {writer}; scan with writers=[{writer!r}]")
    tops = data["top_examples"]["dla_minus_adjusted"]
    bos = data["meta"].get("prepend_bos")
    c = open_corpus(corpus, seq_len=data["meta"]["seq_len"])
    rows_needed = sorted({e["row"] for e in tops[:top]})
    rows = {}
    for i, r in c.rows(min(rows_needed) if rows_needed else 0):
        if i in rows_needed:
            rows[i] = r if bos is None else np.concatenate([[bos], r[:-1]])  # as the scan saw it
        if len(rows) == len(rows_needed):
            break
    tok = getattr(model, "tokenizer", None)
    out = []
    for rank, e in enumerate(tops[:top]):
        ctx = rows[e["row"]][max(0, e["pos"] - context + 1): e["pos"] + 2]
        text = tok.decode(ctx[:-1]) + " ⟶ " + tok.decode(ctx[-1:]) if tok is not None else " ".join(map(str, ctx.tolist()))
        item = dict(rank=rank, row=e["row"], pos=e["pos"], dla=e["dla"], adjusted_dla=e["adjusted_dla"],
                    gap=abs(e["dla"]) - abs(e["adjusted_dla"]), context=text)
        if rank < recheck:
            window = torch.from_numpy(rows[e["row"]][: e["pos"] + 2].astype(np.int64))[None]
            t = causal_check(model, window, writer, erasers)
            er = t[t.node.isin(list(erasers))]
            item.update(erasers_pr_clean=float(er.clean_median.sum()), erasers_pr_patched=float(er.patched_median.sum()))
        out.append(item)
    return pd.DataFrame(out)
