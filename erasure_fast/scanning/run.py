"""`scan()`: stream a token corpus through a model and aggregate DLA and erasure in constant memory."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..version import __version__
from ..attribution import resolve_writers, run_attribution
from ..backends import get_backend
from ..capture import model_device
from ..models import model_spec
from . import checkpoint as ckpt
from .aggregate import SeriesStats, TopK
from .corpus import CorpusError, TokenCorpus, open_corpus
from .distributed import all_gather, all_reduce_sum, rank_and_world

PR_RANGE = (-3.0, 3.0)  # projection ratios: 0.005-wide bins
PR_BINS = 1200
DLA_RANGE = (-10.0, 10.0)  # logits: 0.01-wide bins
DLA_BINS = 2000
POSITION_EDGES = (1, 16, 128)  # buckets [0] (BOS), [1, 16), [16, 128), [128, n_ctx)


@dataclass
class ScanConfig:
    writers: List[int]
    writer_labels: List[str]
    node_labels: List[str]
    resid_labels: List[str]
    head_labels: List[str]
    seq_len: int
    batch_size: int
    prepend_bos: Optional[int]
    position_edges: Sequence[int]
    top_k: int
    backend: str
    model_fingerprint: str
    corpus: dict

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=list).encode()).hexdigest()[:20]


def model_fingerprint(model) -> str:
    """Hash of every parameter's bytes (and names), so a changed model refuses to resume."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(str(p.dtype).encode())
            t = p.detach().cpu().contiguous()
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


class Aggregates:
    """All running aggregates of a scan (see aggregate.py for the statistics)."""

    def __init__(self, cfg: ScanConfig):
        W = len(cfg.writers)
        self.n_pr_series = (len(cfg.node_labels) + len(cfg.resid_labels)) * W
        self.n_buckets = len(cfg.position_edges) + 1
        self.pr = SeriesStats(self.n_pr_series, self.n_buckets, *PR_RANGE, PR_BINS)
        self.dla = SeriesStats(len(cfg.head_labels) + W, self.n_buckets, *DLA_RANGE, DLA_BINS)
        # payload: [sum of downstream PR, DLA_w, adjusted DLA_w]
        self.top_erasure = TopK(W, cfg.top_k, payload=3)
        self.top_adversarial = TopK(W, cfg.top_k, payload=3)
        self.tokens = 0
        self.rows = 0
        self.batches = 0  # next batch index for this rank

    def parts(self):
        return {"pr": self.pr, "dla": self.dla, "top_erasure": self.top_erasure, "top_adversarial": self.top_adversarial}

    def state(self) -> Dict[str, np.ndarray]:
        out = {}
        for name, part in self.parts().items():
            out.update(part.state(name))
        return out

    def load(self, arrays: Dict[str, np.ndarray]) -> None:
        for name, part in self.parts().items():
            part.load(arrays, name)

    def merge(self, other: "Aggregates") -> None:
        mine = self.parts()
        for name, part in other.parts().items():
            mine[name].merge(part)


def _bucket_of(positions: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    return torch.bucketize(positions, torch.tensor(list(edges)), right=True)


def _update(agg: Aggregates, res, rows: torch.Tensor, edges) -> None:
    B, P = res.dla.shape[:2]
    T = B * P
    pos = torch.arange(P).repeat(B)
    row = rows.repeat_interleave(P)
    bucket = _bucket_of(pos, edges)
    pr = res.pr.reshape(T, -1)
    resid = res.resid_pr.reshape(T, -1)
    agg.pr.update(torch.cat([pr, resid], dim=1), bucket)
    head_dla = res.dla.reshape(T, -1)
    w_dla = res.writer_dla.reshape(T, -1)
    adj = res.adjusted_dla.reshape(T, -1)
    agg.dla.update(torch.cat([head_dla, adj], dim=1), bucket)
    erased = res.downstream_pr_sum.reshape(T, -1)
    payload = torch.stack([erased, w_dla, adj], dim=-1)
    agg.top_erasure.update(-erased, row, pos, payload)
    agg.top_adversarial.update(w_dla.abs() - adj.abs(), row, pos, payload)


def _batches(corpus: TokenCorpus, batch_size: int, start_batch: int, rank: int, world: int, max_rows: Optional[int]):
    """(batch index, row ids [b], tokens [b, seq_len]) for this rank, from ``start_batch`` on."""
    rows, ids, b = [], [], start_batch
    limit = corpus.n_rows if max_rows is None else (max_rows if corpus.n_rows is None else min(max_rows, corpus.n_rows))
    for i, row in corpus.rows(start_batch * batch_size):
        if limit is not None and i >= limit:
            break
        rows.append(row)
        ids.append(i)
        if len(rows) == batch_size:
            if b % world == rank:
                yield b, np.array(ids), np.stack(rows)
            rows, ids, b = [], [], b + 1
    if rows and b % world == rank:
        yield b, np.array(ids), np.stack(rows)


@dataclass
class ScanResult:
    out_dir: str
    summary: "object"  # pandas DataFrame
    meta: dict
    files: Dict[str, str] = field(default_factory=dict)


def scan(
    model,
    corpus,
    *,
    writers="all",
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    out_dir: str = "scan_out",
    resume: bool = True,
    backend: str = "auto",
    max_tokens: Optional[int] = None,
    prepend_bos: Optional[int] = None,
    checkpoint_every: int = 20,
    top_k: int = 20,
    position_edges: Sequence[int] = POSITION_EDGES,
    progress: bool = True,
    report: bool = True,
    tokenizer=None,
    stop_after_batches: Optional[int] = None,
    notes: Optional[str] = None,
) -> Optional[ScanResult]:
    """Erasure scan of ``corpus`` through ``model`` (TransformerLens bridge or HookedTransformer).

    Args:
        corpus: path (.npy / .bin / .txt / .jsonl / dataset dir or hub name), numpy array or TokenCorpus.
        writers: "all" or heads (index, (layer, head), "L0H2").
        seq_len: row length (needed for 1-D streams; defaults to the rows' length or 1024).
        batch_size: rows per forward pass.
        out_dir: where checkpoints and the report go.
        resume: continue from ``out_dir``'s checkpoint when its configuration matches.
        max_tokens: stop after this many tokens (whole rows).
        prepend_bos: a token id to put at position 0 of every row (the row keeps seq_len tokens).
        checkpoint_every: batches between checkpoints.
        stop_after_batches: testing hook: stop (as if killed) after this many batches in this call.
        notes: a line for the top of the report (e.g. that the model is synthetic).

    Returns:
        `ScanResult` on rank 0 (None on other ranks). Under torch.distributed (torchrun) every rank
        takes every world-th batch and the aggregates are reduced before the report.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    spec = model_spec(model)
    if not spec.has_mlps:
        raise ValueError("scan needs MLP outputs for residual PR; attention-only models are not supported yet")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    corpus = open_corpus(corpus, seq_len=seq_len, tokenizer=tokenizer)
    if spec.n_ctx is not None and corpus.seq_len > spec.n_ctx:
        raise ValueError(f"seq_len {corpus.seq_len} exceeds the model's n_ctx {spec.n_ctx}")
    if prepend_bos is not None and not 0 <= int(prepend_bos) < spec.d_vocab:
        raise ValueError(f"prepend_bos must be a token id in [0, {spec.d_vocab}), got {prepend_bos}")
    rank, world = rank_and_world()
    dev = model_device(model)
    impl = get_backend(backend, dev, spec.W_O.dtype)
    wr = resolve_writers(writers, spec)
    L = spec.n_layers
    cfg = ScanConfig(
        writers=wr.tolist(), writer_labels=[spec.head_label(int(w)) for w in wr],
        node_labels=spec.head_labels() + [f"MLP{l}" for l in range(L)],
        resid_labels=["resid_pre0"] + [f"resid_{k}{l}" for l in range(L) for k in ("mid", "post")],
        head_labels=spec.head_labels(), seq_len=corpus.seq_len, batch_size=batch_size,
        prepend_bos=None if prepend_bos is None else int(prepend_bos), position_edges=list(position_edges),
        top_k=top_k, backend=impl.NAME, model_fingerprint=model_fingerprint(model), corpus=corpus.describe(),
    )
    digest = cfg.digest()
    agg = Aggregates(cfg)
    ck_path = os.path.join(out_dir, "checkpoint", f"rank{rank}-of-{world}.npz")
    elapsed_before = 0.0
    ckpt.remove_stale_temporaries(ck_path)  # a run killed mid-write leaves its temp file behind
    if resume:
        found = ckpt.load(ck_path)
        if found is not None:
            arrays, meta = found
            if meta.get("config_digest") != digest:
                diff = [k for k, v in cfg.__dict__.items() if meta.get("config", {}).get(k) != (list(v) if isinstance(v, tuple) else v)]
                raise ValueError(
                    f"{ck_path} was written by a scan with a different configuration (differs in: "
                    f"{', '.join(diff) or 'unknown'}); use another out_dir or resume=False"
                )
            agg.load(arrays)
            agg.tokens, agg.rows, agg.batches = meta["tokens"], meta["rows"], meta["next_batch"]
            elapsed_before = meta.get("elapsed", 0.0)
    max_rows = None if max_tokens is None else max(1, max_tokens // corpus.seq_len)

    def save_checkpoint(elapsed):
        meta = dict(config_digest=digest, config=json.loads(json.dumps(cfg.__dict__, default=list)),
                    tokens=agg.tokens, rows=agg.rows, next_batch=agg.batches, elapsed=elapsed)
        ckpt.save(ck_path, agg.state(), meta)

    total_rows = corpus.n_rows if max_rows is None else (max_rows if corpus.n_rows is None else min(max_rows, corpus.n_rows))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if total_rows is None else total_rows * corpus.seq_len // world, initial=agg.tokens,
                   unit="tok", unit_scale=True, desc=f"scan ({impl.NAME})", dynamic_ncols=True)
    t_start = time.perf_counter()
    done_here = 0
    edges = cfg.position_edges
    for b, row_ids, toks in _batches(corpus, batch_size, agg.batches, rank, world, max_rows):
        tokens = torch.from_numpy(toks)
        if prepend_bos is not None:
            tokens = torch.cat([torch.full((tokens.shape[0], 1), int(prepend_bos)), tokens[:, :-1]], dim=1)
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= spec.d_vocab:
            bad = int(row_ids[int(((tokens < 0) | (tokens >= spec.d_vocab)).any(1).nonzero()[0])])
            where = corpus.byte_offset(bad)
            raise CorpusError(
                f"{corpus.source}: row {bad}{'' if where is None else f' (byte offset {where})'} has token ids "
                f"outside [0, d_vocab={spec.d_vocab}) (values in [{lo}, {hi}])"
            )
        tokens = tokens.to(dev)
        ids = torch.full_like(tokens, -1)
        ids[:, :-1] = tokens[:, 1:]
        res = run_attribution(model, spec, tokens, wr, ids, None, include_mlps=True, impl=impl)
        _update(agg, res, torch.from_numpy(row_ids), edges)
        agg.tokens += tokens.numel()
        agg.rows += tokens.shape[0]
        agg.batches = b + 1
        done_here += 1
        if bar is not None:
            bar.update(tokens.numel())
        if done_here % checkpoint_every == 0:
            save_checkpoint(elapsed_before + time.perf_counter() - t_start)
        if stop_after_batches is not None and done_here >= stop_after_batches:
            save_checkpoint(elapsed_before + time.perf_counter() - t_start)
            if bar is not None:
                bar.close()
            return None
    elapsed = elapsed_before + time.perf_counter() - t_start
    save_checkpoint(elapsed)
    if bar is not None:
        bar.close()
    totals = dict(tokens=agg.tokens, rows=agg.rows, elapsed=elapsed)
    if world > 1:
        merged = Aggregates(cfg)
        for part in all_gather(agg.state()):  # merged in rank order: deterministic
            other = Aggregates(cfg)
            other.load(part)
            merged.merge(other)
        merged.tokens, merged.rows, merged.batches = agg.tokens, agg.rows, agg.batches
        agg = merged
        t = all_reduce_sum({"tokens": np.array([agg.tokens]), "rows": np.array([agg.rows])})
        totals.update(tokens=int(t["tokens"][0]), rows=int(t["rows"][0]))
        mx = torch.tensor([elapsed], dtype=torch.float64)
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
        totals["elapsed"] = float(mx[0])
    if rank != 0:
        return None
    meta = dict(
        model=getattr(getattr(model, "cfg", None), "model_name", None) or type(model).__name__,
        model_fingerprint=cfg.model_fingerprint, corpus=cfg.corpus, tokens=totals["tokens"], rows=totals["rows"],
        backend=impl.NAME, world_size=world, elapsed_s=totals["elapsed"],
        tokens_per_s=totals["tokens"] / totals["elapsed"] if totals["elapsed"] > 0 else None,
        writers=cfg.writer_labels, seq_len=cfg.seq_len, batch_size=batch_size, prepend_bos=cfg.prepend_bos,
        position_edges=list(edges), pr_hist=dict(lo=PR_RANGE[0], hi=PR_RANGE[1], bins=PR_BINS),
        dla_hist=dict(lo=DLA_RANGE[0], hi=DLA_RANGE[1], bins=DLA_BINS),
        versions=_versions(), machine=platform.platform(), config_digest=digest, notes=notes,
    )
    from .report import summarize, write_report

    summary = summarize(agg, cfg, spec)
    files = write_report(out_dir, summary, agg, cfg, meta, make_plots=report) if report else {}
    return ScanResult(out_dir=out_dir, summary=summary, meta=meta, files=files)


def _versions() -> dict:
    from importlib import metadata

    out = {"erasure_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformer-lens", "numpy", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
