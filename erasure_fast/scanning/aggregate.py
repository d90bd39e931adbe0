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
A batch on a GPU is folded on that device, into a copy of the whole state kept there while batches
arrive (`_DeviceState`): histograms, counts, moments and top-k entries are updated there by the same
torch code the CPU's reference path runs, with no operation that reads a value back to the host
(no ``.item()``, no data-dependent shapes, no bincount), so a batch never waits for the GPU. The state
crosses to the host only when it is read: `state` (a checkpoint: a copy, the device keeps folding),
or any field, `summary`, `load` and `merge` (the state moves home). Folding on the device or on the
host runs the same float64 operations in the same order, so where the state lives does not change it.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

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


def chan_merge(n_a: torch.Tensor, mean_a: torch.Tensor, m2_a: torch.Tensor, n_b: torch.Tensor,
               mean_b: torch.Tensor, m2_b: torch.Tensor):
    """Chan et al.'s parallel update: (mean, m2) of running (count n_a, mean_a, m2_a) combined with a
    batch's (n_b, mean_b, m2_b); counts int64, the rest float64, all of one shape and device."""
    n_a = n_a.to(torch.float64)
    n = n_a + n_b
    some = n > 0
    delta = mean_b - mean_a
    frac = torch.where(some, n_b / torch.where(some, n, 1.0), 0.0)
    new = n_b > 0
    mean = torch.where(new, mean_a + delta * frac, mean_a)
    m2 = torch.where(new, m2_a + m2_b + delta * delta * n_a * frac, m2_a)
    return mean, m2


class _DeviceState:
    """A state's arrays as torch tensors on a device: on the CPU views of the host arrays (folding
    there updates them in place), elsewhere copies that are the state until they are brought home."""

    def __init__(self, host: Dict[str, np.ndarray], device: torch.device):
        self.device = device
        self.t = {k: torch.from_numpy(v).to(device) for k, v in host.items()}
        self.aliases_host = device.type == "cpu"

    def write(self, name: str, value: torch.Tensor) -> None:
        self.t[name].copy_(value)  # in place: on the CPU this is the host array

    def copy_home(self) -> Dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.t.items()}


class _StateOnDevice:
    """The host arrays of a state (``_host``, the fields ``_FIELDS``) and, while batches are folded on
    a device, their device copy: reading a field brings the state home first; `snapshot` copies it
    without moving it."""

    _FIELDS: tuple = ()

    def _init_state(self, host: Dict[str, np.ndarray]) -> None:
        self._host = host
        self._dev: Optional[_DeviceState] = None

    def _on(self, device: torch.device) -> _DeviceState:
        """The state on ``device``, moved there if it is elsewhere."""
        if self._dev is None or self._dev.device != device:
            self._home()
            self._dev = _DeviceState(self._host, device)
        return self._dev

    def _home(self) -> None:
        if self._dev is not None:
            if not self._dev.aliases_host:
                for k, v in self._dev.copy_home().items():
                    self._host[k][...] = v  # in place: arrays handed out earlier stay the state's
            self._dev = None

    def snapshot(self) -> Dict[str, np.ndarray]:
        """Every field as numpy, without moving the state (copies where it is on a device)."""
        if self._dev is not None and not self._dev.aliases_host:
            return self._dev.copy_home()
        return dict(self._host)

    def state(self, prefix: str) -> Dict[str, np.ndarray]:
        """Every field under ``prefix.`` (a copy where the state is on a device, which keeps it)."""
        return {f"{prefix}.{k}": v for k, v in self.snapshot().items()}

    def load(self, state: Dict[str, np.ndarray], prefix: str) -> None:
        for k in self._FIELDS:
            arr = state[f"{prefix}.{k}"]
            if arr.shape != getattr(self, k).shape:
                raise ValueError(f"checkpoint field {prefix}.{k} has shape {arr.shape}, expected {getattr(self, k).shape}")
            setattr(self, k, arr.copy())


def _field(name: str) -> property:
    def get(self):
        self._home()
        return self._host[name]

    def set(self, value):
        self._home()
        self._host[name] = value

    return property(get, set, doc=f"the state's {name} array (brings the state home from a device)")


class SeriesStats(_StateOnDevice):
    _FIELDS = ("count", "nan", "mean", "m2", "hist")
    count, nan, mean, m2, hist = (_field(k) for k in _FIELDS)

    def __init__(self, n_series: int, n_buckets: int, lo: float, hi: float, n_bins: int):
        if not hi > lo or n_bins < 1:
            raise ValueError(f"histogram range must have hi > lo and n_bins >= 1, got [{lo}, {hi}] x {n_bins}")
        self.S, self.B, self.lo, self.hi, self.nb = n_series, n_buckets, float(lo), float(hi), int(n_bins)
        self._group: Optional["SeriesGroup"] = None  # this one alone, for the torch path (`_alone`)
        self._init_state(dict(
            count=np.zeros((n_buckets, n_series), np.int64), nan=np.zeros((n_buckets, n_series), np.int64),
            mean=np.zeros((n_buckets, n_series), np.float64), m2=np.zeros((n_buckets, n_series), np.float64),
            hist=np.zeros((n_buckets, n_series, n_bins + 2), np.int64)))  # underflow, bins, overflow

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
        if kernel is None:  # the torch reference, on the values' device
            self._alone().update([v], bucket)
            return
        counted, mean_b, m2_b = kernel(v.contiguous().numpy(), bucket.contiguous().numpy(), self.B, self.lo,
                                       1.0 / self.bin_width, self.nb, self.hist)
        self.fold_batch(np.bincount(bucket.numpy(), minlength=self.B), counted, mean_b, m2_b)

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
        self.fold_batch(np.bincount(bucket.numpy(), minlength=self.B), counted, mean_b, m2_b)

    def fold_batch(self, tokens: np.ndarray, counted: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Fold a batch whose histogram is already added: tokens [B] per bucket, and count / mean / m2
        [B, S] of its finite values (the rest count as NaN)."""
        as_t = torch.from_numpy
        self._alone().fold(torch.device("cpu"), as_t(np.asarray(tokens, np.int64)),
                           [(as_t(np.asarray(counted, np.int64)), as_t(np.asarray(mean_b, np.float64)),
                             as_t(np.asarray(m2_b, np.float64)))])

    def fold_bucket(self, b: int, tokens: int, counted: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """`fold_batch` for a batch whose ``tokens`` all lie in bucket ``b``: count / mean / m2 [S]."""
        full = [np.zeros((self.B, self.S), x.dtype) for x in (counted, mean_b, m2_b)]
        for into, x in zip(full, (counted, mean_b, m2_b)):
            into[b] = x
        per_bucket = np.zeros(self.B, np.int64)
        per_bucket[b] = tokens
        self.fold_batch(per_bucket, *full)

    def _alone(self) -> "SeriesGroup":
        if self._group is None:
            self._group = SeriesGroup([self])
        return self._group

    def _batch_reference(self, v: torch.Tensor, bucket: torch.Tensor):
        """The batch's histogram [B, S, n_bins + 2] and (count, mean, m2) [B, S] of its finite values,
        as torch tensors on v's device: the reference of the compiled kernel (csrc/scan_aggregates.h)
        and the GPU path (`SeriesGroup.batch`). Nothing here reads a value back to the host."""
        return self._alone().batch([v], bucket.to(v.device, torch.int64).reshape(-1))[0]

    def _merge_moments(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Chan et al.: combine (count, mean, M2) with a batch's; call before adding n_b to count."""
        as_t = torch.from_numpy
        mean, m2 = chan_merge(as_t(self.count), as_t(self.mean), as_t(self.m2), as_t(np.asarray(n_b, np.int64)),
                              as_t(np.asarray(mean_b, np.float64)), as_t(np.asarray(m2_b, np.float64)))
        self.mean, self.m2 = mean.numpy(), m2.numpy()
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
    def merge(self, other: "SeriesStats") -> None:
        self._merge_moments(other.count, other.mean, other.m2)
        for k in ("count", "nan", "hist"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


class SeriesGroup:
    """`SeriesStats` over the same S series folded together on the torch path (a GPU's): one
    histogram scatter, one set of moment products and one update of each state field (foreach) for
    all of them, where one `update` each would launch every operation once per statistic (on a GPU
    each is a kernel launch: a scan's nine ranking statistics fold in 154 operations per batch,
    their values included, instead of 642). Each member keeps its own range, bins and buckets; a
    member with one bucket takes every token. Histograms and counts are those of the compiled kernel;
    moments agree with it to rounding."""

    def __init__(self, stats: Sequence[SeriesStats]):
        stats = list(stats)
        if not stats or any(st.S != stats[0].S for st in stats):
            raise ValueError(f"a SeriesGroup needs statistics over the same series, got {[st.S for st in stats]}")
        self.stats = stats
        self.S = stats[0].S
        self.B = max(st.B for st in stats)
        sizes = [st.B * st.S * (st.nb + 2) for st in stats]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._constants: Dict[tuple, Dict[str, torch.Tensor]] = {}

    def _consts(self, device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """Per member [k, 1, 1]: lo and 1 / bin width in the values' dtype (the arithmetic of one
        update: its Python floats act in that dtype), bins, bins + 2, bucket factor (0: one bucket),
        histogram offset; made once per device and dtype, so a batch copies nothing to the device."""
        key = (str(device), dtype)
        if key not in self._constants:
            col = lambda xs, dt: torch.tensor(xs, dtype=dt).reshape(-1, 1, 1).to(device)  # noqa: E731
            st = self.stats
            self._constants[key] = dict(
                lo=col([x.lo for x in st], torch.float64).to(dtype),
                inv_width=col([1.0 / x.bin_width for x in st], torch.float64).to(dtype),
                top=col([float(x.nb) for x in st], dtype),
                nb2=col([x.nb + 2 for x in st], torch.int64),
                factor=col([1 if x.B > 1 else 0 for x in st], torch.int64),
                offset=col(self._offsets[:-1].tolist(), torch.int64),
                buckets=torch.arange(self.B, device=device),
                series=torch.arange(self.S, device=device))
        return self._constants[key]

    def batch(self, values: Sequence[torch.Tensor], bucket: torch.Tensor):
        """For each member, its histogram [B, S, n_bins + 2] and (count, mean, m2) [B, S] of the finite
        entries of its values [T, S] (one dtype and device for all), tokens in ``bucket`` [T]."""
        v = torch.stack(list(values)) if len(values) > 1 else values[0][None]  # [k, T, S]
        dev_ = v.device
        c = self._consts(dev_, v.dtype)
        finite = torch.isfinite(v)
        bk = bucket[None, :, None] * c["factor"]  # [k, T, 1]: each member's bucket of each token
        # bin 0 = underflow (< lo), 1..nb inside, nb + 1 = overflow (>= hi); non-finite -> a dump slot
        bins = ((v - c["lo"]) * c["inv_width"]).floor_().clamp_(min=-1).clamp_(max=c["top"]).add_(1)
        flat = bins.to(torch.int64)
        flat += (bk * self.S + c["series"]) * c["nb2"] + c["offset"]
        dump = int(self._offsets[-1])
        flat = torch.where(finite, flat, torch.full((), dump, dtype=torch.int64, device=dev_)).reshape(-1)
        # a scatter, not bincount: bincount on a GPU reads the largest index back to size its output
        hist = torch.zeros(dump + 1, dtype=torch.int64, device=dev_)
        hist.index_add_(0, flat, torch.ones(1, dtype=torch.int64, device=dev_).expand(flat.shape[0]))
        # Moments per member and bucket as batched [B, T] x [T, S] products.
        one_hot = (bk == c["buckets"]).to(torch.float64)  # [k, T, B]
        per_bucket = one_hot.transpose(1, 2)
        zero = torch.zeros((), dtype=torch.float64, device=dev_)
        counted = torch.bmm(per_bucket, finite.to(torch.float64))  # exact: integers below 2^53
        vz = torch.where(finite, v.to(torch.float64), zero)
        mean_b = torch.bmm(per_bucket, vz) / counted.clamp(min=1)
        dev = torch.where(finite, vz - torch.bmm(one_hot, mean_b), zero)
        m2_b = torch.bmm(per_bucket, dev * dev)
        counted = counted.to(torch.int64)
        out = []
        for i, st in enumerate(self.stats):
            h = hist[int(self._offsets[i]):int(self._offsets[i + 1])].view(st.B, self.S, st.nb + 2)
            out.append((h, counted[i, : st.B], mean_b[i, : st.B], m2_b[i, : st.B]))
        return out

    def update(self, values: Sequence[torch.Tensor], bucket: torch.Tensor) -> None:
        """Fold each member's values [T, S] (NaN = undefined), tokens in ``bucket`` [T] int in [0, B),
        where the values are (`SeriesStats.update` for each, in one pass)."""
        values = [x.detach().reshape(-1, self.S) for x in values]
        dtype = torch.promote_types(values[0].dtype, torch.float32)
        values = [x.to(dtype) for x in values]
        bucket = bucket.detach().to(values[0].device, torch.int64).reshape(-1)
        dev = bucket.device
        tokens = torch.zeros(self.B, dtype=torch.int64, device=dev)
        tokens.index_add_(0, bucket, torch.ones(1, dtype=torch.int64, device=dev).expand(bucket.shape[0]))
        parts = self.batch(values, bucket)
        torch._foreach_add_([st._on(dev).t["hist"] for st in self.stats], [h for h, _, _, _ in parts])
        self.fold(dev, tokens, [p[1:] for p in parts])

    def fold(self, device: torch.device, tokens: torch.Tensor, parts) -> None:
        """Fold a batch whose histograms are already added into every member's state on ``device``:
        tokens [B] per bucket, and for each member (count, mean, m2) [its B, S] of its finite values
        (the rest count as NaN). Each state field is updated by one operation for all members
        (foreach) and the moments merged as one flat vector: the same element-wise float64 operations
        as member by member."""
        states = [st._on(device).t for st in self.stats]
        every = tokens.sum(0, keepdim=True)
        flat = lambda xs: xs[0].reshape(-1) if len(xs) == 1 else torch.cat([x.reshape(-1) for x in xs])  # noqa: E731
        counted = [c for c, _, _ in parts]
        n_tok = flat([(tokens if st.B > 1 else every)[:, None].expand(st.B, self.S) for st in self.stats])
        count, n_b = flat([t["count"] for t in states]), flat(counted)
        mean, m2 = chan_merge(count, flat([t["mean"] for t in states]), flat([t["m2"] for t in states]), n_b,
                              flat([m for _, m, _ in parts]), flat([m for _, _, m in parts]))
        sizes = [st.B * self.S for st in self.stats]
        torch._foreach_add_([t["nan"] for t in states], [x.view_as(c) for x, c in zip((n_tok - n_b).split(sizes), counted)])
        torch._foreach_copy_([t["mean"] for t in states], [x.view_as(c) for x, c in zip(mean.split(sizes), counted)])
        torch._foreach_copy_([t["m2"] for t in states], [x.view_as(c) for x, c in zip(m2.split(sizes), counted)])
        torch._foreach_add_([t["count"] for t in states], counted)


def _ranked(score: torch.Tensor, row: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[S, n] order of each series' entries: largest score first, ties by (row, pos), entries without
    a finite score last (by row, pos); numpy's lexsort((pos, row, -score)) as stable sorts."""
    key = torch.where(torch.isfinite(score), -score, torch.inf)
    order = torch.argsort(pos, dim=1, stable=True)
    order = order.gather(1, torch.argsort(row.gather(1, order), dim=1, stable=True))
    return order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))


class TopK(_StateOnDevice):
    """The k largest scores per series, with row / position, a float payload [E] and a token context
    [C] (ids around the position; -1 = none) per entry."""

    _FIELDS = ("score", "row", "pos", "payload", "context")
    score, row, pos, payload, context = (_field(k) for k in _FIELDS)

    def __init__(self, n_series: int, k: int, payload: int = 0, context: int = 0):
        self.S, self.k, self.E, self.C = n_series, int(k), int(payload), int(context)
        self._init_state(dict(
            score=np.full((n_series, k), -np.inf), row=np.full((n_series, k), -1, np.int64),
            pos=np.full((n_series, k), -1, np.int64), payload=np.full((n_series, k, max(payload, 0)), np.nan),
            context=np.full((n_series, k, max(context, 0)), -1, np.int64)))

    def update(self, score: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, payload: torch.Tensor = None,
               context: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """score [T, S] (NaN ignored), row / pos [T], payload [T, S, E]; ``context`` maps flat token
        indices [kk, S] to their contexts [kk, S, C] (int ids). The batch's top k per series is taken
        and merged into the state where ``score`` is (see the module docstring)."""
        score = score.detach().to(torch.float64)
        dev = score.device
        score = torch.where(torch.isnan(score), torch.full_like(score, -np.inf), score)
        kk = min(self.k, score.shape[0])
        top, idx = torch.topk(score, kk, dim=0)  # [kk, S]
        batch = dict(score=top.T, row=row.to(dev)[idx].T, pos=pos.to(dev)[idx].T)
        if payload is None:
            batch["payload"] = torch.full((self.S, kk, self.E), np.nan, dtype=torch.float64, device=dev)
        else:
            pay = payload.detach().to(torch.float64)
            batch["payload"] = torch.gather(pay, 0, idx[:, :, None].expand(kk, self.S, pay.shape[2])).transpose(0, 1)
        batch["context"] = (torch.full((self.S, kk, self.C), -1, dtype=torch.int64, device=dev) if context is None
                            else context(idx).to(torch.int64).transpose(0, 1))
        self._keep(self._on(dev), batch)

    def _keep(self, state: _DeviceState, batch: Dict[str, torch.Tensor]) -> None:
        """Keep the k best of the state's entries and ``batch``'s ({field: [S, n, ...]}) in ``state``."""
        cand = {f: torch.cat([state.t[f], batch[f].to(state.device)], dim=1) for f in self._FIELDS}
        order = _ranked(cand["score"], cand["row"], cand["pos"])[:, : self.k]
        for f, c in cand.items():
            state.write(f, c.gather(1, order if c.ndim == 2 else order[:, :, None].expand(-1, -1, c.shape[2])))

    def merge(self, other: "TopK") -> None:
        self._keep(self._on(torch.device("cpu")), {f: torch.from_numpy(getattr(other, f)) for f in self._FIELDS})
