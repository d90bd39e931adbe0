"""A scan's running state: every aggregate (see aggregate.py), the token counters, and the hash of
the tokens read so far, with their update from one batch's attribution."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..models import downstream_mask
from .aggregate import SeriesStats, TopK
from .pair_stats import (NULL_STATISTICS, STATISTICS, NullGroup, NullReference, fold_pair_values, null_dots,
                         null_groups, pair_group)
from .plan import CONTEXT, CONTEXT_BEFORE, DLA_BINS, DLA_RANGE, PR_BINS, PR_RANGE, ScanConfig

PAIR_CHUNK_BYTES = 64 << 20  # the per-pair statistics run in token chunks whose null dots ([chunk, pairs]) fit this

EMPTY_HASH = "0" * 32


def chain_hash(previous: str, tokens: np.ndarray) -> str:
    """blake2b(previous hash, these int64 ids): one link of a hash chain."""
    h = hashlib.blake2b(bytes.fromhex(previous), digest_size=16)
    h.update(np.ascontiguousarray(tokens, dtype="<i8").tobytes())
    return h.hexdigest()


def chain_rows(previous: str, rows: np.ndarray) -> str:
    """The hash of the rows read so far, one link per row of ``rows`` [n, seq_len]: it depends on the
    tokens and their order only, not on how they were batched. A checkpoint stores it after every
    chunk it aggregated (`Aggregates.hash_marks`); a resumed scan re-reads those rows and must arrive
    at the same values, so a corpus changed anywhere in the part already aggregated refuses to
    resume, naming the first chunk that differs."""
    for row in rows:
        previous = chain_hash(previous, row)
    return previous


@dataclass(frozen=True)
class BatchConstants:
    """A batch shape's per-token positions and position buckets [T], the ranked pairs and the null's
    groups, on the device the batches are folded on (`Aggregates.constants`): made once, so a batch
    copies nothing to the device beyond its own row ids."""

    pos: torch.Tensor
    bucket: torch.Tensor
    pair_index: torch.Tensor
    null_groups: List[NullGroup]


class Aggregates:
    """All running aggregates of a scan, plus tokens / rows / next batch / content hash."""

    def __init__(self, cfg: ScanConfig):
        W = len(cfg.writers)
        self.n_pr_series = (len(cfg.node_labels) + len(cfg.resid_labels)) * W
        self.n_buckets = len(cfg.position_edges) + 1
        self.pr = SeriesStats(self.n_pr_series, self.n_buckets, *PR_RANGE, PR_BINS)
        self.dla = SeriesStats(len(cfg.head_labels) + W, self.n_buckets, *DLA_RANGE, DLA_BINS)
        # payload: [sum of downstream PR, DLA_w, adjusted DLA_w]; every writer keeps its own top k
        self.top_erasure = TopK(W, cfg.top_k, payload=3, context=CONTEXT)
        self.top_adversarial = TopK(W, cfg.top_k, payload=3, context=CONTEXT)
        # ranking statistics for the downstream (node, writer) pairs only, per position bucket (the
        # report's distributions by position); their nulls over all positions (the ranking's threshold)
        self.pair_index = torch.from_numpy(downstream_pairs(cfg))
        self.null_groups = null_groups(self.pair_index, W, len(cfg.head_labels))  # how `null_dots` forms them
        self._constants: Dict[tuple, "BatchConstants"] = {}
        self.pair_stats = {name: SeriesStats(len(self.pair_index), self.n_buckets if name in STATISTICS else 1, *rng)
                           for name, rng in {**STATISTICS, **NULL_STATISTICS}.items()}
        self.pair_group = pair_group(self.pair_stats)  # folded together on the torch path
        self.tokens = 0
        self.rows = 0
        self.batches = 0  # next batch index for this rank
        self.content_hash = EMPTY_HASH
        # (rows read so far, content_hash) after each chunk this rank hashed -- a batch, or the rest
        # of one that an earlier, smaller max_tokens cut short -- so a resume re-reads the same chunks
        self.hash_marks: List[Tuple[int, str]] = []

    def constants(self, device: torch.device, B: int, P: int, edges: Sequence[int]) -> "BatchConstants":
        """What every batch of B rows of P positions folds with, made once on ``device``."""
        key = (str(device), B, P, tuple(edges))
        if key not in self._constants:
            pos = torch.arange(P).repeat(B)
            self._constants[key] = BatchConstants(
                pos=pos.to(device), bucket=_bucket_of(pos, edges).to(device), pair_index=self.pair_index.to(device),
                null_groups=[replace(g, cols=g.cols.to(device)) for g in self.null_groups])
        return self._constants[key]

    def read_chunk(self, tokens: np.ndarray) -> None:
        """Count and hash a chunk of rows [n, seq_len] that has been aggregated."""
        self.tokens += tokens.size
        self.rows += tokens.shape[0]
        self.content_hash = chain_rows(self.content_hash, tokens)
        self.hash_marks.append((self.rows, self.content_hash))

    def parts(self):
        return {"pr": self.pr, "dla": self.dla, "top_erasure": self.top_erasure, "top_adversarial": self.top_adversarial,
                **{f"pair.{name}": stats for name, stats in self.pair_stats.items()}}

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

    def counters(self) -> dict:
        return dict(tokens=self.tokens, rows=self.rows, next_batch=self.batches, content_hash=self.content_hash)

    def mark_arrays(self) -> Dict[str, np.ndarray]:
        """`hash_marks` as checkpoint arrays: rows [n] int64, hashes [n, 16] uint8."""
        rows = np.array([r for r, _ in self.hash_marks], dtype=np.int64)
        digests = b"".join(bytes.fromhex(h) for _, h in self.hash_marks)
        return {"prefix.rows": rows, "prefix.hashes": np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16).copy()}

    def load_counters(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        self.tokens, self.rows, self.batches = meta["tokens"], meta["rows"], meta["next_batch"]
        self.content_hash = meta["content_hash"]
        self.hash_marks = [(int(r), bytes(h).hex()) for r, h in zip(arrays["prefix.rows"], arrays["prefix.hashes"])]
        last = self.hash_marks[-1] if self.hash_marks else (0, EMPTY_HASH)
        if last != (self.rows, self.content_hash):
            raise ValueError(f"checkpoint: its last hash mark {last} is not its row count and hash "
                             f"{(self.rows, self.content_hash)}")


def downstream_pairs(cfg: ScanConfig) -> np.ndarray:
    """Flat indices (node * W + writer) of the pairs whose node reads the writer
    (`erasure_fast.models.downstream_mask`); nothing else can erase a writer."""
    H = cfg.n_heads
    mask = downstream_mask(cfg.writers, len(cfg.node_labels), len(cfg.head_labels) // H, H, cfg.parallel_blocks)
    return np.flatnonzero(mask.numpy().reshape(-1)).astype(np.int64)  # row-major [node, writer]: node * W + w


def _bucket_of(positions: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    return torch.bucketize(positions, torch.tensor(list(edges)), right=True)


def _update_pair_stats(agg: Aggregates, res, T: int, null: NullReference, const: BatchConstants) -> None:
    """Fold the batch's ranking statistics (pair_stats.py) into their histograms, in token chunks."""
    n_nodes, W = res.dots.shape[2], res.dots.shape[3]
    dots = res.dots.reshape(T, n_nodes, W)
    norms = res.norms.reshape(T, n_nodes)
    z = res.z.reshape(T, -1, res.z.shape[-1])
    mlp = res.extra.get("mlp_out")  # None for an attention-only model
    mlp = None if mlp is None else mlp.reshape(T, -1, mlp.shape[-1])
    d_model = null.d_model
    resid_norm = res.final_scale.reshape(T).double() * d_model ** 0.5  # |x| = sqrt(d_model) * final-norm scale
    idx, bucket = const.pair_index, const.bucket
    chunk = max(256, PAIR_CHUNK_BYTES // (8 * max(1, len(idx))))  # a GELU-4L batch of 8K tokens: one chunk
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        nd = null_dots(z[lo:hi], None if mlp is None else mlp[lo:hi], null, const.null_groups)
        fold_pair_values(agg.pair_stats, dots[lo:hi], norms[lo:hi], res.writers, nd, resid_norm[lo:hi], idx, bucket[lo:hi],
                         agg.pair_group)


def token_context(tokens: torch.Tensor):
    """For tokens [B, P] (as the model read them): a function of flat token indices [...] to the ids
    around each ([..., CONTEXT]: CONTEXT_BEFORE before it, the token, then those after; -1 outside
    the row)."""
    P = tokens.shape[1]

    def context(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(tokens.device)
        row, pos = idx // P, idx % P
        at = pos[..., None] + torch.arange(-CONTEXT_BEFORE, CONTEXT - CONTEXT_BEFORE, device=tokens.device)
        inside = (at >= 0) & (at < P)
        ids = tokens[row[..., None].expand_as(at), at.clamp(0, P - 1)]
        return torch.where(inside, ids, torch.full_like(ids, -1))

    return context


def update(agg: Aggregates, res, rows: torch.Tensor, edges: Sequence[int], null: NullReference,
           tokens: torch.Tensor) -> None:
    """Fold one batch's `AttributionResult` (kept with ``keep_mlp_out``; rows: [B] corpus row ids;
    tokens [B, P] the ids the model read) into the aggregates; ``null`` holds the null reference's
    directions."""
    B, P = res.dla.shape[:2]
    T = B * P
    dev = res.dla.device  # aggregated where the attribution ran (SeriesStats / TopK.update)
    const = agg.constants(dev, B, P, edges)
    pos, bucket = const.pos, const.bucket
    row = rows.to(dev)[:, None].expand(B, P).reshape(T)
    n_nodes, W = res.dots.shape[2:]
    pr_blocks = [res.dots.reshape(T, n_nodes, W)] + ([] if res.resid_dots is None else [res.resid_dots.reshape(T, -1, W)])
    agg.pr.update_ratios(pr_blocks, res.writer_sq_norms.reshape(T, W), bucket)  # PR of nodes, then residual points
    head_dla = res.dla.reshape(T, -1)
    w_dla = res.writer_dla.reshape(T, -1)
    adj = res.adjusted_dla.reshape(T, -1)
    agg.dla.update(torch.cat([head_dla, adj], dim=1), bucket)
    _update_pair_stats(agg, res, T, null.to(dev), const)
    erased = res.downstream_pr_sum.reshape(T, -1)
    payload = torch.stack([erased, w_dla, adj], dim=-1)
    context = token_context(tokens)
    agg.top_erasure.update(-erased, row, pos, payload, context)
    agg.top_adversarial.update(w_dla.abs() - adj.abs(), row, pos, payload, context)
