"""The adversarial-example miner: a scan's positions with the largest |DLA_w| - |adjusted DLA_w|,
shown in context and re-checked with the causal patch.

The miner reads a finished scan (its summary.json) and the corpus the scan read. Every input is
checked before the first forward pass by the helpers below, which `erasure-fast paper mine` also
calls to validate a job up front: `read_scan_summary` (the scan), `check_scan_model` (the same
weights), `open_scanned_corpus` (the same corpus) and `scan_candidate_rows` (the rows it needs).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..models import as_transformer_lens, model_spec
from ..paths import expand_path
from ..scanning import CorpusError, TokenCorpus, open_corpus
from ..scanning.plan import model_fingerprint
from .causal import causal_check
from .common import DEFAULT_ERASERS, eraser_layer
from .support import check_paper_support

MINED_EXAMPLES = "dla_minus_adjusted"  # the summary.json top-example list the miner ranks


def read_scan_summary(scan_result) -> dict:
    """The summary.json of a finished scan (a ScanResult or its output directory), checked to hold
    what the miner needs: the focus writer, its top examples, and the scanned corpus and seq_len."""
    path = scan_result if isinstance(scan_result, (str, os.PathLike)) else getattr(scan_result, "out_dir", None)
    if path is None:
        raise TypeError(f"scan_result must be a ScanResult or a scan output directory, got {type(scan_result).__name__}")
    path = expand_path(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (expected the output directory of an erasure-fast scan)")
    file = os.path.join(path, "summary.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has no summary.json: not the output of a finished erasure-fast scan with its report")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file} cannot be read as JSON ({e})") from None
    for keys in (("focus_writer",), ("top_examples", MINED_EXAMPLES), ("meta", "seq_len"), ("meta", "corpus", "source")):
        node = data
        try:
            for key in keys:
                node = node[key]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"{file} has no {'.'.join(keys)} (not a summary written by an erasure-fast scan)") from None
    return data


def check_scan_model(summary: dict, model) -> None:
    """Refuse a model other than the one the scan used (parameter fingerprint, when recorded): the
    scan's DLA numbers and the re-check would be about different weights."""
    meta = summary["meta"]
    spec = model_spec(model)
    recorded = meta.get("model_fingerprint")
    if recorded and model_fingerprint(model) != recorded:
        raise ValueError(f"the scan was made with another model ({meta.get('model')}, fingerprint {recorded}); "
                         "load the model the scan used")
    if spec.n_ctx is not None and meta["seq_len"] > spec.n_ctx:
        raise ValueError(f"the scan's rows of {meta['seq_len']} tokens exceed the model's n_ctx {spec.n_ctx}")
    bos = meta.get("prepend_bos")
    if bos is not None and not 0 <= bos < spec.d_vocab:
        raise ValueError(f"the scan's BOS id {bos} is outside the model's vocabulary [0, {spec.d_vocab})")


def recorded_bin_dtype(summary: dict) -> Optional[str]:
    """The dtype the scan read its corpus with, when it recorded one (a raw .bin file holds none):
    the record's ``dtype``, or the middle of an older 'digest:dtype:[shape]' fingerprint."""
    record = summary["meta"]["corpus"]
    names = ("uint16", "uint32", "int32", "int64")
    if record.get("format", "bin") != "bin":  # a .npy or an array says its own dtype
        return None
    if record.get("dtype") in names:
        return record["dtype"]
    parts = str(record.get("fingerprint", "")).split(":")
    return parts[1] if len(parts) == 3 and parts[1] in names else None


def open_scanned_corpus(corpus, summary: dict, *, tokenizer=None, bin_dtype: Optional[str] = None,
                        name: Optional[str] = None) -> TokenCorpus:
    """``corpus`` (path, token array or TokenCorpus) opened as the scan read it (its seq_len; a raw
    .bin file with ``bin_dtype``, else the dtype the scan recorded), refused unless what identifies
    it (rows, seq_len, dtype, shape, size, content digest: every field the scan recorded that the
    reopened corpus also describes, its path aside) agrees: the candidates' row and position
    indices only mean something in the corpus the scan read. ``name``: the corpus in messages."""
    record = summary["meta"]["corpus"]
    try:
        opened = open_corpus(corpus, seq_len=summary["meta"]["seq_len"], tokenizer=tokenizer,
                             bin_dtype=bin_dtype or recorded_bin_dtype(summary))
    except OSError as e:  # a missing or unreadable file: a user error, said in one line
        raise CorpusError(f"{corpus}: cannot be read ({e.strerror or e})") from None
    described = opened.describe()
    differs = [f"{key} {described[key]} here vs {record[key]} in the scan"
               for key in sorted(described) if key != "source" and key in record and described[key] != record[key]]
    if differs:
        raise CorpusError(f"{name or opened.source} is not the corpus the scan read ({record['source']}): {'; '.join(differs)}")
    return opened


def scan_candidate_rows(summary: dict, corpus: TokenCorpus, *, top: int, d_vocab: Optional[int] = None) -> Dict[int, np.ndarray]:
    """{row: token ids [seq_len] as the scan saw them (its BOS prepended)} for the scan's ``top``
    candidates, checked to exist in ``corpus`` and (given ``d_vocab``) to hold valid token ids."""
    tops = summary["top_examples"][MINED_EXAMPLES][:top]
    needed = sorted({int(e["row"]) for e in tops})
    bos = summary["meta"].get("prepend_bos")
    rows = {}
    if needed:
        for i, r in corpus.rows(needed[0]):
            if i in needed:
                rows[i] = r if bos is None else np.concatenate([[bos], r[:-1]])  # as the scan saw it
            if len(rows) == len(needed) or i >= needed[-1]:
                break
    missing = [i for i in needed if i not in rows]
    if missing:
        size = f"it has {corpus.n_rows} rows" if corpus.n_rows is not None else "it ends before them"
        raise CorpusError(f"{corpus.source}: the scan's candidates are in rows {missing[:5]}, not in this corpus ({size})")
    for i, r in rows.items():
        if d_vocab is not None and (r.min() < 0 or r.max() >= d_vocab):
            raise CorpusError(f"{corpus.source}: row {i} has token ids outside [0, d_vocab={d_vocab})")
    return rows


def mine_adversarial(model, scan_result, corpus, *, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS,
                     top: int = 10, context: int = 12, recheck: int = 3):
    """Rank the scan's candidate positions by |DLA_w| - |adjusted DLA_w| (from its top-k), show their
    context (decoded with the model's tokenizer when it has one), and re-check the best ``recheck``
    with the causal patch as the authors apply it (`causal_check`, every head of the erasers' layer
    patched; the erasers' summed median PR onto the writer before / after). ``scan_result``: a
    ScanResult or scan output directory whose focus writer is ``writer``, made with ``model``;
    ``corpus``: the scanned corpus (path, token array or TokenCorpus). Every input is checked before
    the first forward pass (ValueError / TypeError). Returns a DataFrame."""
    model = as_transformer_lens(model)
    import pandas as pd

    for name, value, least in (("top", top, 1), ("context", context, 1), ("recheck", recheck, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    data = read_scan_summary(scan_result)
    if data["focus_writer"] != writer:
        raise ValueError(f"the scan's top examples are for {data['focus_writer']}, not {writer}; scan with writers=[{writer!r}]")
    if recheck:
        eraser_layer(model, writer, erasers)
        check_paper_support(model, "mine", writer, erasers)
    check_scan_model(data, model)
    tok = getattr(model, "tokenizer", None)
    c = open_scanned_corpus(corpus, data, tokenizer=tok)
    rows = scan_candidate_rows(data, c, top=top, d_vocab=model_spec(model).d_vocab)
    out = []
    for rank, e in enumerate(data["top_examples"][MINED_EXAMPLES][:top]):
        ctx = rows[e["row"]][max(0, e["pos"] - context + 1): e["pos"] + 2]
        text = tok.decode(ctx[:-1]) + " ⟶ " + tok.decode(ctx[-1:]) if tok is not None else " ".join(map(str, ctx.tolist()))
        item = dict(rank=rank, row=e["row"], pos=e["pos"], dla=e["dla"], adjusted_dla=e["adjusted_dla"],
                    gap=abs(e["dla"]) - abs(e["adjusted_dla"]), context=text)
        if rank < recheck:
            window = torch.from_numpy(rows[e["row"]][: e["pos"] + 2].astype(np.int64))[None]
            t = causal_check(model, window, writer, erasers, analysis="mine")
            er = t[t.node.isin(list(erasers))]
            item.update(erasers_pr_clean=float(er.clean_median.sum()), erasers_pr_patched=float(er.patched_median.sum()))
        out.append(item)
    return pd.DataFrame(out)
