"""Constant-memory, mergeable, deterministic aggregation of per-token measures.

`SeriesStats` keeps, for S series (e.g. every (node, writer) pair) and every position bucket:
count, NaN count, fp64 mean and sum of squared deviations (merged per batch with Chan et al.'s
parallel update, which stays accurate where sum-of-squares formulas cancel), and a fixed-bin histogram with an underflow and an
overflow bin. Quantiles come from the histogram by linear interpolation inside the bin that holds
them, so their error is at most one bin width ((hi - lo) / n_bins) when the quantile lies inside
[lo, hi]; a quantile that falls in an overflow bin is reported as -inf / +inf and counted.
`TopK` keeps the k largest scores per series with their (row, position), a payload and the tokens
around the position, ties broken by (row, position) so the result does not depend on batch
boundaries or merge order.
States are dicts of numpy arrays (saved as npz, reduced with torch.distributed).
A batch on the CPU is folded in by the compiled kernel (csrc/scan_aggregates.h; one vectorised pass,
shifted sums for the moments) where the extension is built, else by the torch reference
`SeriesStats._batch_reference`: identical histograms and counts, moments within 1e-12 relative.
Ratios (the scan's projection ratios, dots / |w|^2) are folded by `SeriesStats.update_ratios`, whose
kernel reads the dots in place and divides as it bins, so a batch's [T, series] PR is never formed.
A batch on a GPU is folded in by the same torch reference on that device: its histogram counts
accumulate there (``_pending``) and reach the numpy state when it is read (``hist``: checkpoint,
summary, merge), so per batch only the [buckets, series] moments cross to the host, never the values.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

from ..backends.scan_kernels import scan_kernel, scan_rows
from ..contract import safe_div


def centred_bins(half_range: float, width: float):
    """(lo, hi, n_bins) of a histogram of ``width``-wide bins centred on the multiples of ``width``
    from -half_range to half_range. A value on such a multiple -- a head's PR onto itself (1), a
    zero, a cosine of +-1 -- then sits mid-bin, so the quantiles of a series of that constant value
    are that value; with bin edges on round numbers they were half a bin off (PR 1.0025)."""
    n = int(round(2 * half_range / width)) + 1
    return -half_range - width / 2, half_range + width / 2, n


class SeriesStats:
    def __init__(self, n_series: int, n_buckets: int, lo: float, hi: float, n_bins: int):
        if not hi > lo or n_bins < 1:
            raise ValueError(f"histogram range must have hi > lo and n_bins >= 1, got [{lo}, {hi}] x {n_bins}")
        self.S, self.B, self.lo, self.hi, self.nb = n_series, n_buckets, float(lo), float(hi), int(n_bins)
        self.count = np.zeros((n_buckets, n_series), np.int64)
        self.nan = np.zeros((n_buckets, n_series), np.int64)
        self.mean = np.zeros((n_buckets, n_series), np.float64)
        self.m2 = np.zeros((n_buckets, n_series), np.float64)
        self._hist = np.zeros((n_buckets, n_series, n_bins + 2), np.int64)
        self._pending = None  # histogram counts of batches folded on a device, not yet in _hist

    @property
    def hist(self) -> np.ndarray:
        """[n_buckets, n_series, n_bins + 2] counts (underflow, bins, overflow), with every batch folded."""
        self._fold_pending()
        return self._hist

    def _fold_pending(self) -> None:
        if self._pending is not None:
            self._hist += self._pending.cpu().numpy()
            self._pending = None

    @hist.setter
    def hist(self, value: np.ndarray) -> None:
        self._pending = None
        self._hist = value

    @property
    def bin_width(self) -> float:
        return (self.hi - self.lo) / self.nb

    def update(self, values: torch.Tensor, bucket: torch.Tensor) -> None:
        """values [T, S] (any float dtype, NaN = undefined), bucket [T] int in [0, n_buckets); folded
        where ``values`` are (the bucket ids follow them)."""
        v = values.detach().reshape(-1, self.S)
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        bucket = bucket.detach().to(v.device, torch.int64).reshape(-1)
        kernel = scan_kernel("series_stats_batch", v)
        if kernel is not None:
            counted, mean_b, m2_b = kernel(v.contiguous().numpy(), bucket.contiguous().numpy(), self.B, self.lo,
                                           1.0 / self.bin_width, self.nb, self.hist)
        else:  # the torch reference, on the values' device
            counted, mean_b, m2_b = self._batch_reference(v, bucket)
        self.fold_batch(torch.bincount(bucket, minlength=self.B).cpu().numpy(), counted, mean_b, m2_b)

    def update_ratios(self, blocks: Sequence[torch.Tensor], divisor: torch.Tensor, bucket: torch.Tensor) -> None:
        """`update` with the values ``cat([b.reshape(T, -1) for b in blocks], 1)``, each divided by
        ``divisor`` at its last-axis column (NaN where it is 0, the contract's `projection_ratio`):
        blocks [T, R_k, W] (e.g. dots, whose ratios to the writers' squared norms [T, W] are the
        projection ratios). On the CPU the compiled kernel reads the blocks in place and never forms
        the ratios; elsewhere they are formed in torch (the same float division, so the same bins)."""
        dtype = divisor.dtype if divisor.dtype in (torch.float32, torch.float64) else torch.float32
        divisor = divisor.detach().to(dtype)
        blocks = [b.detach().to(dtype) for b in blocks]
        kernel = scan_kernel("ratio_stats_batch", divisor)
        if kernel is None:
            T = divisor.shape[0]
            self.update(torch.cat([safe_div(b, divisor[:, None, :]).reshape(T, -1) for b in blocks], dim=1), bucket)
            return
        bucket = bucket.detach().to(torch.int64).reshape(-1)
        counted, mean_b, m2_b = kernel([scan_rows(b).numpy() for b in blocks], divisor.contiguous().numpy(),
                                       bucket.contiguous().numpy(), self.B, self.lo, 1.0 / self.bin_width, self.nb,
                                       self.hist)
        self.fold_batch(torch.bincount(bucket, minlength=self.B).numpy(), counted, mean_b, m2_b)

    def fold_batch(self, tokens: np.ndarray, counted: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Fold a batch whose histogram is already added: tokens [B] per bucket, and count / mean / m2
        [B, S] of its finite values (the rest count as NaN)."""
        self.nan += tokens[:, None] - counted
        self._merge_moments(counted, mean_b, m2_b)
        self.count += counted

    def fold_bucket(self, b: int, tokens: int, counted: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """`fold_batch` for a batch whose ``tokens`` all lie in bucket ``b``: count / mean / m2 [S]."""
        full = [np.zeros((self.B, self.S), x.dtype) for x in (counted, mean_b, m2_b)]
        for into, x in zip(full, (counted, mean_b, m2_b)):
            into[b] = x
        per_bucket = np.zeros(self.B, np.int64)
        per_bucket[b] = tokens
        self.fold_batch(per_bucket, *full)

    def _batch_reference(self, v: torch.Tensor, bucket: torch.Tensor):
        """The batch's histogram and (count, mean, m2) [B, S] (numpy) of its finite values, in torch on
        v's device: the reference of the compiled kernel (csrc/scan_aggregates.h), and the GPU path.
        The histogram is added to ``_pending`` on that device (integer counts: exact, any order)."""
        dev_ = v.device
        finite = torch.isfinite(v)
        nb2 = self.nb + 2
        # bin 0 = underflow (< lo), 1..nb inside, nb + 1 = overflow (>= hi); non-finite -> a dump slot
        bins = ((v - self.lo) * (1.0 / self.bin_width)).floor_().clamp_(-1, self.nb).add_(1)
        flat = bins.to(torch.int64)
        flat += (bucket * (self.S * nb2))[:, None]
        flat += (torch.arange(self.S, device=dev_) * nb2)[None, :]
        dump = self.B * self.S * nb2
        flat = torch.where(finite, flat, torch.full((), dump, dtype=torch.int64, device=dev_))
        hist = torch.bincount(flat.reshape(-1), minlength=dump + 1)[:dump].reshape(self.B, self.S, nb2)
        if self._pending is None or self._pending.device != dev_:
            self._fold_pending()  # counts pending on another device first
            self._pending = hist
        else:
            self._pending += hist
        counted_t = hist.sum(dim=2)
        # Batch mean and squared deviations per bucket as [B, T] x [T, S] products.
        zero = torch.zeros((), dtype=torch.float64, device=dev_)
        vz = torch.where(finite, v.to(torch.float64), zero)
        one_hot = torch.nn.functional.one_hot(bucket, self.B).to(torch.float64)  # [T, B]
        mean_b = (one_hot.T @ vz) / counted_t.to(torch.float64).clamp(min=1)
        dev = torch.where(finite, vz - mean_b[bucket], zero)
        m2_b = one_hot.T @ (dev * dev)
        return counted_t.cpu().numpy(), mean_b.cpu().numpy(), m2_b.cpu().numpy()

    def _merge_moments(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Chan et al.: combine (count, mean, M2) with a batch's; call before adding n_b to count."""
        n_a = self.count.astype(np.float64)
        n = n_a + n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean_b - self.mean
            frac = np.where(n > 0, n_b / np.where(n > 0, n, 1), 0.0)
            self.mean = np.where(n_b > 0, self.mean + delta * frac, self.mean)
            self.m2 = np.where(n_b > 0, self.m2 + m2_b + delta * delta * n_a * frac, self.m2)

    # -- reading -----------------------------------------------------------------------------
    def _pick(self, buckets) -> Dict[str, np.ndarray]:
        idx = list(range(self.B)) if buckets is None else list(buckets)
        acc = SeriesStats(self.S, 1, self.lo, self.hi, self.nb)
        for b in idx:  # merge the buckets' moments in a fixed order
            acc._merge_moments(self.count[b][None], self.mean[b][None], self.m2[b][None])
            acc.count += self.count[b][None]
        hist = self.hist
        picked = hist[idx[0]]  # one bucket: a view (summary only reads it); more: summed slice by slice,
        if len(idx) > 1:       # never through a fancy-indexed copy of all of them
            picked = picked.copy()
            for b in idx[1:]:
                picked += hist[b]
        return dict(count=self.count[idx].sum(0), nan=self.nan[idx].sum(0), mean=acc.mean[0], m2=acc.m2[0], hist=picked)

    def summary(self, buckets: Sequence[int] = None, qs=(0.125, 0.25, 0.5, 0.75, 0.875)) -> Dict[str, np.ndarray]:
        """count, nan, mean, std and the quantiles ``q{q}`` of every series over ``buckets`` (all by default)."""
        p = self._pick(buckets)
        n = p["count"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, p["mean"], np.nan)
            var = np.where(n > 1, p["m2"] / np.maximum(n - 1, 1), np.nan)
        out = dict(count=p["count"], nan=p["nan"], mean=mean, std=np.sqrt(np.maximum(var, 0)),
                   underflow=p["hist"][:, 0].copy(), overflow=p["hist"][:, -1].copy())  # not views of the live state
        cum = np.cumsum(p["hist"], axis=1)  # once for every quantile
        for q in qs:
            out[f"q{q:g}"] = self._quantile(p["hist"], cum, n, q)
        return out

    def _quantile(self, hist: np.ndarray, cum: np.ndarray, n: np.ndarray, q: float) -> np.ndarray:
        """The q-quantile of every series from its histogram [S, n_bins + 2], the histogram's cumulative
        sum along the bins and the count [S] (vectorised)."""
        target = q * n
        k = np.minimum((cum < target[:, None]).sum(axis=1), self.nb + 1)  # = searchsorted(cum[s], target[s], "left")
        rows = np.arange(hist.shape[0])
        before = np.where(k > 0, cum[rows, np.maximum(k - 1, 0)], 0)
        inside = hist[rows, k]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(inside > 0, (target - before) / np.where(inside > 0, inside, 1), 0.5)
        out = self.lo + (k - 1 + frac) * self.bin_width
        out = np.where(k == 0, -np.inf, np.where(k == self.nb + 1, np.inf, out))
        return np.where(n == 0, np.nan, out)

    # -- persistence and merging -------------------------------------------------------------
    def state(self, prefix: str) -> Dict[str, np.ndarray]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("count", "nan", "mean", "m2", "hist")}

    def load(self, state: Dict[str, np.ndarray], prefix: str) -> None:
        for k in ("count", "nan", "mean", "m2", "hist"):
            arr = state[f"{prefix}.{k}"]
            if arr.shape != getattr(self, k).shape:
                raise ValueError(f"checkpoint field {prefix}.{k} has shape {arr.shape}, expected {getattr(self, k).shape}")
            setattr(self, k, arr.copy())

    def merge(self, other: "SeriesStats") -> None:
        self._merge_moments(other.count, other.mean, other.m2)
        for k in ("count", "nan", "hist"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


class TopK:
    """The k largest scores per series, with row / position, a float payload [E] and a token context
    [C] (ids around the position; -1 = none) per entry."""

    FIELDS = ("score", "row", "pos", "payload", "context")

    def __init__(self, n_series: int, k: int, payload: int = 0, context: int = 0):
        self.S, self.k, self.E, self.C = n_series, int(k), int(payload), int(context)
        self.score = np.full((n_series, k), -np.inf)
        self.row = np.full((n_series, k), -1, np.int64)
        self.pos = np.full((n_series, k), -1, np.int64)
        self.payload = np.full((n_series, k, max(payload, 0)), np.nan)
        self.context = np.full((n_series, k, max(context, 0)), -1, np.int64)

    def update(self, score: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, payload: torch.Tensor = None,
               context=None) -> None:
        """score [T, S] (NaN ignored), row / pos [T], payload [T, S, E]; ``context`` maps flat token
        indices [kk, S] to their contexts [kk, S, C] (int ids). The batch's top k per series is taken
        where ``score`` is; only those k rows (and their contexts) cross to the host."""
        score = score.detach().to(torch.float64)
        dev = score.device
        score = torch.where(torch.isnan(score), torch.full_like(score, -np.inf), score)
        kk = min(self.k, score.shape[0])
        top, idx = torch.topk(score, kk, dim=0)  # [kk, S]
        batch = dict(score=top.cpu().numpy(), row=row.to(dev)[idx].cpu().numpy(), pos=pos.to(dev)[idx].cpu().numpy())
        if payload is None:
            batch["payload"] = np.full((kk, self.S, self.E), np.nan)
        else:
            pay = payload.detach().to(torch.float64)
            batch["payload"] = torch.gather(pay, 0, idx[:, :, None].expand(kk, self.S, pay.shape[2])).cpu().numpy()
        batch["context"] = (np.full((kk, self.S, self.C), -1, np.int64) if context is None
                            else context(idx).to(torch.int64).cpu().numpy())
        for s in range(self.S):
            self._keep(s, {f: np.concatenate([getattr(self, f)[s], batch[f][:, s]]) for f in self.FIELDS})

    def _keep(self, s: int, cand: Dict[str, np.ndarray]) -> None:
        score = cand["score"]
        valid = np.isfinite(score)
        # Largest score first; ties by (row, pos); invalid entries (-inf) last.
        order = np.lexsort((cand["pos"], cand["row"], -np.where(valid, score, -np.inf)))[: self.k]
        for f in self.FIELDS:
            getattr(self, f)[s] = cand[f][order]

    def state(self, prefix: str) -> Dict[str, np.ndarray]:
        return {f"{prefix}.{f}": getattr(self, f) for f in self.FIELDS}

    def load(self, state: Dict[str, np.ndarray], prefix: str) -> None:
        for k in self.FIELDS:
            arr = state[f"{prefix}.{k}"]
            if arr.shape != getattr(self, k).shape:
                raise ValueError(f"checkpoint field {prefix}.{k} has shape {arr.shape}, expected {getattr(self, k).shape}")
            setattr(self, k, arr.copy())

    def merge(self, other: "TopK") -> None:
        for s in range(self.S):
            self._keep(s, {f: np.concatenate([getattr(self, f)[s], getattr(other, f)[s]]) for f in self.FIELDS})
