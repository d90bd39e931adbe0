"""The compiled batch kernel of the scan's running statistics (csrc/scan_aggregates.h, called by
`SeriesStats.update`) against the torch reference `SeriesStats._batch_reference`: identical histograms
and counts, moments within 1e-12, on odd shapes with values on and next to bin edges, out of range,
infinite and NaN; independent of the thread count; arguments checked before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erasure_fast.scanning.aggregate import SeriesStats

_C = pytest.importorskip("erasure_fast._C", reason="the C++ extension is not built")
# every test once per kernel path this CPU runs (conftest.each_cpu_path)
pytestmark = pytest.mark.usefixtures("each_cpu_path")


def _tricky_values(T: int, S: int, lo: float, hi: float, nb: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(T, S, generator=g, dtype=torch.float64) * 1.4 - 0.2) * (hi - lo) + lo  # 20 % outside
    width = (hi - lo) / nb
    edges = lo + width * torch.randint(-2, nb + 3, (T, S), generator=g).double()
    pick = torch.rand(T, S, generator=g)
    v = torch.where(pick < 0.3, edges, v)  # exactly on an edge (as the dtype rounds it)
    v = v.to(dtype)
    ulp = torch.nextafter(v, torch.full_like(v, float("inf")))
    v = torch.where((pick >= 0.3) & (pick < 0.4), ulp, v)  # one ulp above an edge
    v[torch.rand(T, S, generator=g) < 0.03] = float("nan")
    v[torch.rand(T, S, generator=g) < 0.01] = float("inf")
    v[torch.rand(T, S, generator=g) < 0.01] = float("-inf")
    v[torch.rand(T, S, generator=g) < 0.01] = 1e30  # far outside, finite
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("T, S, B, lo, hi, nb", [(517, 131, 4, -3.0, 3.0, 1200), (64, 7, 1, -1.0, 1.002, 1001),
                                                 (1, 65, 3, -10.0, 10.0, 2000)])
def test_compiled_batch_equals_the_reference(dtype, T, S, B, lo, hi, nb):
    v = _tricky_values(T, S, lo, hi, nb, dtype, seed=T + S)
    bucket = torch.randint(0, B, (T,), generator=torch.Generator().manual_seed(S))
    fast, ref = SeriesStats(S, B, lo, hi, nb), SeriesStats(S, B, lo, hi, nb)
    fast.hist += 3  # the kernel adds to what is there
    ref.hist += 3
    hist_before = fast.hist
    count, mean, m2 = _C.series_stats_batch_f64(v.numpy(), bucket.numpy(), B, lo, 1.0 / fast.bin_width, nb, fast.hist) \
        if dtype == torch.float64 else \
        _C.series_stats_batch_f32(v.numpy(), bucket.numpy(), B, lo, 1.0 / fast.bin_width, nb, fast.hist)
    assert fast.hist is hist_before  # updated in place
    r_hist, r_count, r_mean, r_m2 = (x.numpy() for x in ref._batch_reference(v, bucket))
    assert (ref.hist == 3).all()  # the reference only returns the batch's histogram
    np.testing.assert_array_equal(fast.hist, ref.hist + r_hist)
    np.testing.assert_array_equal(count, r_count)
    assert count.sum() == int(torch.isfinite(v).sum()) and count.sum() < v.numel()
    assert np.isfinite(mean).all() and np.isfinite(m2).all()
    np.testing.assert_allclose(mean, r_mean, rtol=1e-12, atol=1e-12 * (hi - lo))
    np.testing.assert_allclose(m2, r_m2, rtol=1e-12, atol=1e-12 * (hi - lo) ** 2)
    # Through update(): the same running state either way.
    a, b = SeriesStats(S, B, lo, hi, nb), SeriesStats(S, B, lo, hi, nb)
    a.update(v, bucket)
    b.count, b.mean, b.m2 = b.count.copy(), b.mean.copy(), b.m2.copy()
    hist_b, counted, mean_b, m2_b = (x.numpy() for x in b._batch_reference(v, bucket))
    b.hist += hist_b
    b.nan += np.bincount(bucket.numpy(), minlength=B)[:, None] - counted
    b._merge_moments(counted, mean_b, m2_b)
    b.count += counted
    np.testing.assert_array_equal(a.nan, b.nan)
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_array_equal(a.hist, b.hist)
    np.testing.assert_allclose(a.m2, b.m2, rtol=1e-12, atol=1e-12)


def test_compiled_batch_does_not_depend_on_the_thread_count():
    v = _tricky_values(300, 200, -3.0, 3.0, 1200, torch.float32, seed=3)
    bucket = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(0)).numpy()
    out = []
    for threads in (1, 2, 3):
        hist = np.zeros((4, 200, 1202), np.int64)
        out.append((hist,) + tuple(_C.series_stats_batch_f32(v.numpy(), bucket, 4, -3.0, 200.0, 1200, hist,
                                                             n_threads=threads)))
    for other in out[1:]:
        for x, y in zip(out[0], other):
            np.testing.assert_array_equal(x, y)  # bit-identical


def test_compiled_batch_checks_its_arguments():
    v = np.zeros((5, 3), np.float32)
    hist = np.zeros((2, 3, 12), np.int64)
    kernel = _C.series_stats_batch_f32
    with pytest.raises(ValueError, match=r"bucket must lie in \[0, 2\), got 2 at token 4"):
        kernel(v, np.array([0, 1, 0, 1, 2]), 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match=r"bucket must have shape \[T\]=\[5\]"):
        kernel(v, np.zeros(4, np.int64), 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match=r"hist must have shape \[B, S, n_bins \+ 2\]=\[2, 3, 12\], got \[2, 3, 11\]"):
        kernel(v, np.zeros(5, np.int64), 2, -1.0, 5.0, 10, np.zeros((2, 3, 11), np.int64))
    with pytest.raises(ValueError, match="hist must be a writeable C-contiguous int64 array"):
        kernel(v, np.zeros(5, np.int64), 2, -1.0, 5.0, 10, hist.astype(np.int32))
    with pytest.raises(ValueError, match="hist must be a writeable C-contiguous int64 array"):
        kernel(v, np.zeros(5, np.int64), 2, -1.0, 5.0, 10, np.zeros((2, 12, 3), np.int64).transpose(0, 2, 1))
    frozen = hist.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="hist must be a writeable"):
        kernel(v, np.zeros(5, np.int64), 2, -1.0, 5.0, 10, frozen)
    with pytest.raises(ValueError, match="inv_width finite and > 0"):
        kernel(v, np.zeros(5, np.int64), 2, -1.0, 0.0, 10, hist)
    with pytest.raises(ValueError, match=r"values must have shape \[T, S\]"):
        kernel(np.zeros(5, np.float32), np.zeros(5, np.int64), 2, -1.0, 5.0, 10, hist)
    assert not hist.any()  # nothing was written by a refused call


def _pair_inputs(T, n_nodes, W, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dots = torch.randn(T, n_nodes, W, generator=g, dtype=torch.float64).to(dtype)
    norms = (torch.rand(T, n_nodes, generator=g, dtype=torch.float64) * 4).to(dtype)
    norms[torch.rand(T, n_nodes, generator=g) < 0.05] = 0.0  # a silent node: NaN statistics
    norms[0, 0] = -1e-9  # rounding below zero is clamped
    resid = torch.rand(T, generator=g, dtype=torch.float64) * 30 + 0.1
    if T > 1:
        resid[-1] = 0.0  # a zero stream: NaN erasure scores
    writers = torch.randperm(n_nodes, generator=g)[:W]
    pairs = torch.randperm(n_nodes * W, generator=g)[: n_nodes * W // 2 + 1]
    null = torch.randn(T, len(pairs), generator=g, dtype=torch.float64).to(dtype)  # [T, P], the pairs' order
    wide = torch.randn(T, n_nodes + 3, W, generator=g, dtype=torch.float64).to(dtype)
    wide[:, 1:1 + n_nodes] = dots
    dots = wide[:, 1:1 + n_nodes]  # a view with a token stride, as the attribution's dots are
    return dots, norms, writers, null, resid, pairs


@pytest.mark.parametrize("buckets", [1, 3], ids=["one bucket", "three buckets"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("T, n_nodes, W", [(203, 11, 5), (1, 3, 2), (64, 70, 3)])
def test_compiled_pair_statistics_equal_the_reference(dtype, T, n_nodes, W, buckets):
    """The ranking statistics per position bucket (their nulls over all positions, one bucket): the
    compiled passes, one per bucket over its gathered tokens, against the torch reference."""
    from erasure_fast.scanning.pair_stats import NULL_STATISTICS, STATISTICS, fold_pair_values, pair_values

    dots, norms, writers, null, resid, pairs = _pair_inputs(T, n_nodes, W, dtype, seed=T * n_nodes)
    make = lambda: {name: SeriesStats(len(pairs), buckets if name in STATISTICS else 1, *rng)  # noqa: E731
                    for name, rng in {**STATISTICS, **NULL_STATISTICS}.items()}
    fast, ref = make(), make()
    from erasure_fast.backends.cpp import scan_kernel

    assert scan_kernel("pair_stats_batch", dots) is not None  # so fold_pair_values runs the compiled pass
    # rows of 16 positions: BOS, then positions 1-4, then 5-15 (as a scan's position buckets)
    bucket = torch.bucketize(torch.arange(T) % 16, torch.tensor([1, 5]), right=True) if buckets > 1 else torch.zeros(T, dtype=torch.int64)
    fold_pair_values(fast, dots, norms, writers, null, resid, pairs, bucket)
    values = pair_values(dots, norms, writers, null, resid, pairs)
    for name, stats in ref.items():
        b = bucket if stats.B > 1 else torch.zeros(T, dtype=torch.int64)
        stats.count, stats.mean, stats.m2 = stats.count.copy(), stats.mean.copy(), stats.m2.copy()
        hist_b, counted, mean_b, m2_b = (x.numpy() for x in stats._batch_reference(values[name], b))
        stats.hist += hist_b
        stats.fold_batch(np.bincount(b.numpy(), minlength=stats.B), counted, mean_b, m2_b)
        assert counted.sum() > 0
    for name in ref:
        np.testing.assert_array_equal(fast[name].hist, ref[name].hist, err_msg=name)
        np.testing.assert_array_equal(fast[name].count, ref[name].count, err_msg=name)
        np.testing.assert_array_equal(fast[name].nan, ref[name].nan, err_msg=name)
        np.testing.assert_allclose(fast[name].mean, ref[name].mean, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(fast[name].m2, ref[name].m2, rtol=1e-11, atol=1e-12, err_msg=name)
    assert fast["es"].nan.sum() > 0  # the silent nodes and the zero-norm stream were NaN, not binned
    if buckets > 1 and T > 16:
        assert (fast["es"].count.sum(axis=1) > 0).all()  # every bucket got its own tokens


def test_compiled_pair_statistics_do_not_depend_on_the_thread_count():
    dots, norms, writers, null, resid, pairs = _pair_inputs(203, 11, 5, torch.float32, seed=2)
    bucket = torch.bucketize(torch.arange(203) % 16, torch.tensor([1, 5]), right=True).numpy()
    out = []
    for threads in (1, 2, 3):
        hists = [np.zeros((3 if k < 4 else 1, len(pairs), 42), np.int64) for k in range(9)]
        moments = _C.pair_stats_batch_f32(dots.numpy(), norms.numpy(), null.numpy(), resid.numpy(), writers.numpy(),
                                          pairs.numpy(), np.full(9, -3.0), np.full(9, 7.0), np.full(9, 40, np.int64),
                                          hists, bucket, 3, n_threads=threads)
        out.append(hists + list(moments))
    for other in out[1:]:
        for x, y in zip(out[0], other):
            np.testing.assert_array_equal(x, y)  # bit-identical


def test_compiled_pair_statistics_check_their_arguments():
    dots, norms, writers, null, resid, pairs = _pair_inputs(6, 4, 2, torch.float32, seed=0)
    hists = [np.zeros((1, len(pairs), 12), np.int64) for _ in range(9)]
    args = lambda **kw: {**dict(dots=dots.numpy(), norms=norms.numpy(), null_dots=null.numpy(), resid_norm=resid.numpy(),  # noqa: E731
                                writers=writers.numpy(), pairs=pairs.numpy(), lo=np.full(9, -1.0), inv_width=np.full(9, 5.0),
                                n_bins=np.full(9, 10, np.int64), hists=hists, bucket=np.zeros(6, np.int64), n_buckets=1), **kw}
    kernel = _C.pair_stats_batch_f32
    with pytest.raises(ValueError, match=r"pairs must be flat indices node \* W \+ writer in \[0, 8\), got 8"):
        kernel(**args(pairs=np.array([0, 8])))
    with pytest.raises(ValueError, match=r"writers must be node indices in \[0, 4\), got -1"):
        kernel(**args(writers=np.array([0, -1])))
    with pytest.raises(ValueError, match=rf"null_dots must have shape \[T, P\]=\[6, {len(pairs)}\], got \[{len(pairs)}, 6\]"):
        kernel(**args(null_dots=np.zeros((len(pairs), 6), np.float32)))
    with pytest.raises(ValueError, match=r"dots must have dtype float32, got float64"):
        kernel(**args(dots=dots.double().numpy()))
    with pytest.raises(ValueError, match=r"dots must have contiguous rows over its last two dimensions"):
        kernel(**args(dots=dots.transpose(1, 2).contiguous().transpose(1, 2).numpy()))
    with pytest.raises(ValueError, match=r"hists\[3\] must have shape \[1 or n_buckets, P, n_bins \+ 2\]=\[1 or 1, "):
        kernel(**args(hists=hists[:3] + [np.zeros((1, len(pairs), 11), np.int64)] + hists[4:]))
    with pytest.raises(ValueError, match=r"hists\[0\] must have shape \[1 or n_buckets, P, n_bins \+ 2\]=\[1 or 3, "):
        kernel(**args(hists=[np.zeros((2, len(pairs), 12), np.int64)] + hists[1:], n_buckets=3))
    with pytest.raises(ValueError, match=r"bucket must lie in \[0, 2\), got 2 at token 5"):
        kernel(**args(bucket=np.array([0, 1, 0, 1, 1, 2]), n_buckets=2))
    with pytest.raises(ValueError, match=r"bucket must have shape \[T\]=\[6\], got \[5\]"):
        kernel(**args(bucket=np.zeros(5, np.int64)))
    with pytest.raises(ValueError, match="n_buckets must be >= 1, got 0"):
        kernel(**args(n_buckets=0))
    with pytest.raises(ValueError, match="hists must hold 9 arrays, got 8"):
        kernel(**args(hists=hists[:8]))
    assert not any(h.any() for h in hists)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("with_mlps", [True, False], ids=["mlps", "attn-only"])
@pytest.mark.parametrize("T, N, dh, D, L, W", [(37, 5, 7, 11, 2, 3), (203, 4, 9, 33, 3, 19)], ids=["small", "wide"])
def test_null_dots_are_each_nodes_output_dotted_with_its_null_direction(dtype, with_mlps, compiled, T, N, dh, D, L, W,
                                                                          monkeypatch):
    """Against float64 built from every node's d_model output: the compiled pass (partial token tiles,
    more writers than a vector's columns) and the torch products it replaces where there is no kernel."""
    from erasure_fast.scanning import pair_stats
    from erasure_fast.scanning.pair_stats import NullReference, null_dots, null_groups

    if not compiled:
        monkeypatch.setattr(pair_stats, "scan_kernel", lambda name, values: None)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(T, N, dh, generator=g, dtype=dtype)
    W_O = torch.randn(N, dh, D, generator=g, dtype=dtype)
    mlp = torch.randn(T, L, D, generator=g, dtype=dtype) if with_mlps else None
    null = NullReference.for_scan(W_O, seed=4, n_writers=W)
    R = null.directions
    assert torch.allclose(R.norm(dim=0), torch.ones(W, dtype=torch.float64))
    outputs = torch.einsum("tnh,nhd->tnd", z.double(), W_O.double())  # every head's d_model output
    if with_mlps:
        outputs = torch.cat([outputs, mlp.double()], dim=1)
    ref = (outputs @ R).reshape(T, -1)  # [T, nodes * W]: column node * W + w
    n_nodes = N + (L if with_mlps else 0)
    # the scan's pairs (sorted, layers' heads sharing writers) and a shuffled subset: every grouping
    sorted_pairs = torch.tensor([n * W + w for n in range(n_nodes) for w in range(W) if (n // 2 + w) % 3])
    for pairs in (sorted_pairs, torch.randperm(n_nodes * W, generator=g)[: n_nodes * W // 2]):
        groups = null_groups(pairs, W, N)
        got = null_dots(z, mlp, null, groups)
        assert got.dtype == dtype and got.shape == (T, len(pairs))
        want = ref[:, pairs]
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err <= (1e-5 if dtype == torch.float32 else 1e-12), err
    assert len(null_groups(sorted_pairs, W, N)) < n_nodes  # nodes with the same writers share a product
    assert null_dots(z, mlp, null, []).shape == (T, 0)  # no pairs ranked


def _null_tasks(T=45, depths=(7, 20, 3), cols=(5, 17, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(T, len(depths), max(depths) + 3, generator=g)
    xs = [wide[:, k, 1:1 + d].numpy() for k, d in enumerate(depths)]  # rows contiguous, a token stride
    dirs = [torch.randn(d, c, generator=g).numpy() for d, c in zip(depths, cols)]
    offsets = np.array([cols[2] + cols[1], 0, cols[1]], np.int64)  # tasks in any order of columns
    return xs, dirs, offsets, sum(cols)


def test_compiled_null_dots_fill_each_tasks_columns_and_do_not_depend_on_the_thread_count():
    xs, dirs, offsets, n_rows = _null_tasks()
    outs = [_C.null_dots_f32(xs, dirs, offsets, n_rows, n_threads=n) for n in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])  # bit-identical
    for x, d, at in zip(xs, dirs, offsets):
        want = x.astype(np.float64) @ d.astype(np.float64)  # [T, n_cols]
        np.testing.assert_allclose(outs[0][:, at:at + d.shape[1]], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    nan_x = [x.copy() for x in xs]
    nan_x[0][3, 2] = np.nan
    out = _C.null_dots_f32(nan_x, dirs, offsets, n_rows)
    assert np.isnan(out[3, offsets[0]:offsets[0] + 5]).all() and not np.isnan(np.delete(out, 3, axis=0)).any()


def test_compiled_null_dots_check_their_arguments():
    xs, dirs, offsets, n_rows = _null_tasks()
    kernel = _C.null_dots_f32
    with pytest.raises(ValueError, match=r"x\[1\] and dirs\[1\] must have dtype float32, got float64 and float32"):
        kernel([xs[0], xs[1].astype(np.float64), xs[2]], dirs, offsets, n_rows)
    with pytest.raises(ValueError, match=r"x\[2\] must have contiguous rows \(any token stride\)"):
        kernel(xs[:2] + [np.asfortranarray(xs[2])], dirs, offsets, n_rows)
    with pytest.raises(ValueError, match=r"x\[1\] must have shape \[T, depth\] with T = 45"):
        kernel([xs[0], xs[1][:44], xs[2]], dirs, offsets, n_rows)
    with pytest.raises(ValueError, match=r"dirs\[0\] must be C-contiguous with shape \[depth, n_cols\] = \[7, >= 1\], got \[6, 5\]"):
        kernel(xs, [dirs[0][:6]] + dirs[1:], offsets, n_rows)
    with pytest.raises(ValueError, match="x, dirs and offsets must hold one entry per task, got 3, 2 and"):
        kernel(xs, dirs[:2], offsets, n_rows)
    with pytest.raises(ValueError, match=r"tile \[0, n_rows\) exactly: task 0 starts at column 19, the columns before it end at 18"):
        kernel(xs, dirs, offsets + np.array([1, 0, 0]), n_rows)  # a gap
    with pytest.raises(ValueError, match=r"tile \[0, n_rows\) exactly: task 2 starts at column 17, the columns before it end at 22"):
        kernel(xs, dirs, offsets - np.array([1, 0, 0]), n_rows)  # an overlap
    with pytest.raises(ValueError, match=r"tile \[0, n_rows\) exactly: they end at column 23, n_rows = 24"):
        kernel(xs, dirs, offsets, n_rows + 1)
    with pytest.raises(ValueError, match="n_rows must be >= 0"):
        kernel(xs, dirs, offsets, -1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cols=st.lists(st.integers(1, 20), min_size=1, max_size=5), T=st.integers(1, 40), data=st.data())
def test_compiled_null_dots_take_every_exact_tiling_and_refuse_the_rest(cols, T, data):
    """Tasks of any widths in any order of columns: an exact tiling of [0, n_rows) gives x @ dirs in each
    task's columns; moving one task's first column, or asking for another n_rows, is refused."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    depths = [data.draw(st.integers(1, 40)) for _ in cols]
    xs = [rng.standard_normal((T, d)).astype(np.float32) for d in depths]
    dirs = [rng.standard_normal((d, c)).astype(np.float32) for d, c in zip(depths, cols)]
    order = data.draw(st.permutations(range(len(cols))))
    offsets = np.zeros(len(cols), np.int64)
    at = 0
    for k in order:
        offsets[k], at = at, at + cols[k]
    out = _C.null_dots_f32(xs, dirs, offsets, at)
    for x, d, o in zip(xs, dirs, offsets):
        want = x.astype(np.float64) @ d.astype(np.float64)
        np.testing.assert_allclose(out[:, o:o + d.shape[1]], want, rtol=1e-5, atol=1e-5 * max(np.abs(want).max(), 1.0))
    moved = offsets.copy()
    moved[data.draw(st.integers(0, len(cols) - 1))] += data.draw(st.integers(-3, 3).filter(bool))
    assert not _tiles(moved, cols, at)  # one column is now written twice or not at all
    with pytest.raises(ValueError, match="tile"):
        _C.null_dots_f32(xs, dirs, moved, at)
    with pytest.raises(ValueError, match="tile|n_rows must be"):
        _C.null_dots_f32(xs, dirs, offsets, at + data.draw(st.integers(-3, 3).filter(bool)))


def _tiles(offsets, cols, n_rows) -> bool:
    covered = np.zeros(n_rows + 64, np.int64)
    for o, c in zip(offsets, cols):
        if o < 0:
            return False
        covered[o:o + c] += 1
    return bool((covered[:n_rows] == 1).all() and not covered[n_rows:].any())


def _running_state(stats: SeriesStats) -> dict:
    return dict(count=stats.count.copy(), nan=stats.nan.copy(), mean=stats.mean.copy(), m2=stats.m2.copy(),
                hist=stats.hist.copy())


def test_reference_path_keeps_the_state_on_its_device_until_read_and_equals_the_kernel(monkeypatch):
    """The path a GPU batch takes (torch reference; the whole state kept on the values' device, a
    checkpoint copying it, a field read moving it home) gives the compiled path's running state over
    several batches, with reads (checkpoint), a load and a merge in between."""
    import erasure_fast.scanning.aggregate as aggregate

    S, B, lo, hi, nb = 37, 3, -3.0, 3.0, 1200
    batches = [(_tricky_values(T, S, lo, hi, nb, torch.float32, seed=T),
                torch.randint(0, B, (T,), generator=torch.Generator().manual_seed(T))) for T in (301, 64, 1, 999)]
    fast = SeriesStats(S, B, lo, hi, nb)
    for v, bucket in batches:
        fast.update(v, bucket)
    monkeypatch.setattr(aggregate, "scan_kernel", lambda name, dtype: None)
    ref = SeriesStats(S, B, lo, hi, nb)
    ref.update(*batches[0])
    assert ref._dev is not None  # the state is where the batch was folded
    saved = ref.state("x")  # a checkpoint copies it and leaves it there
    assert ref._dev is not None and saved["x.hist"].sum() == int(torch.isfinite(batches[0][0]).sum())
    ref.update(*batches[1])
    assert ref.count.sum() == sum(int(torch.isfinite(v).sum()) for v, _ in batches[:2])
    assert ref._dev is None  # a field read brought it home
    resumed = SeriesStats(S, B, lo, hi, nb)
    resumed.load({k: v.copy() for k, v in ref.state("x").items()}, "x")
    other = SeriesStats(S, B, lo, hi, nb)  # the last two batches on another "rank", merged in
    for v, bucket in batches[2:]:
        other.update(v, bucket)
    resumed.merge(other)
    got, want = _running_state(resumed), _running_state(fast)
    for k in ("count", "nan", "hist"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["m2"], want["m2"], rtol=1e-12, atol=1e-9)
    assert resumed.summary()["q0.5"].shape == (S,)


def _ratio_inputs(T, rows, W, dtype, seed):
    """Dots-like blocks [T, R_k, W] (the first a view of a wider array, as dots[:, :n_nodes] is) and
    divisors [T, W] with zeros (NaN ratios), some of them making ratios land on bin edges."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(T, rows[0] + 2, W, generator=g, dtype=torch.float64).to(dtype) * 2
    blocks = [wide[:, 1:1 + rows[0]]] + [(torch.randn(T, r, W, generator=g, dtype=torch.float64) * 3).to(dtype)
                                          for r in rows[1:]]
    divisor = (torch.rand(T, W, generator=g, dtype=torch.float64) * 2 + 0.25).to(dtype)
    divisor[torch.rand(T, W, generator=g) < 0.1] = 0.0
    divisor[:, 0] = 0.5  # d / 0.5 = 2d: a block value that is a bin edge / 2 lands on the edge exactly
    blocks[-1][:, :, 0] = (torch.randint(-600, 600, (T, rows[-1]), generator=g).double() * 0.0025).to(dtype)
    return blocks, divisor


def test_arrays_read_in_place_are_taken_by_dtype_equality_not_identity():
    """An array whose dtype equals the kernel's but is another dtype object (an unpickled array, one
    with metadata) is read as such; a byte-swapped one is refused before any work."""
    import pickle

    blocks, divisor = _ratio_inputs(19, (5,), 3, torch.float32, seed=1)
    dots, div = blocks[0].contiguous().numpy(), divisor.numpy()
    bucket = np.zeros(19, np.int64)
    run = lambda d, hist: _C.ratio_stats_batch_f32([d], div, bucket, 1, -3.0, 200.0, 1200, hist)  # noqa: E731
    want_hist = np.zeros((1, 15, 1202), np.int64)
    want = run(dots, want_hist)
    for d, hist in [(pickle.loads(pickle.dumps(dots)), pickle.loads(pickle.dumps(np.zeros((1, 15, 1202), np.int64)))),
                    (dots.view(np.dtype(np.float32, metadata={"unit": "residual"})), np.zeros((1, 15, 1202), np.int64))]:
        assert d.dtype is not dots.dtype and d.dtype == dots.dtype
        got = run(d, hist)
        np.testing.assert_array_equal(hist, want_hist)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
    swapped = np.zeros((1, 15, 1202), np.int64)
    with pytest.raises(ValueError, match=r"blocks\[0\] must have dtype float32, got >f4"):
        run(dots.astype(">f4"), swapped)
    assert not swapped.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("T, rows, W, B", [(517, (37, 9), 32, 4), (3, (1,), 5, 1), (64, (70, 2, 1), 3, 2)])
def test_compiled_ratios_equal_the_reference_on_the_divided_values(dtype, T, rows, W, B):
    """update_ratios (compiled, blocks read in place) gives update() on the ratios the contract forms
    (safe_div): the same histograms, counts and NaN counts, moments within 1e-12."""
    from erasure_fast.contract import safe_div

    blocks, divisor = _ratio_inputs(T, rows, W, dtype, seed=T + W)
    assert not blocks[0].is_contiguous()
    bucket = torch.randint(0, B, (T,), generator=torch.Generator().manual_seed(W))
    S = sum(rows) * W
    fast, ref = SeriesStats(S, B, -3.0, 3.0, 1200), SeriesStats(S, B, -3.0, 3.0, 1200)
    fast.update_ratios(blocks, divisor, bucket)
    values = torch.cat([safe_div(b, divisor[:, None, :]).reshape(T, -1) for b in blocks], dim=1)
    assert torch.isnan(values).any()
    hist_b, counted, mean_b, m2_b = (x.numpy() for x in ref._batch_reference(values, bucket))
    np.testing.assert_array_equal(fast.hist, hist_b)
    np.testing.assert_array_equal(fast.count, counted)
    np.testing.assert_array_equal(fast.nan, np.bincount(bucket.numpy(), minlength=B)[:, None] - counted)
    np.testing.assert_allclose(fast.mean, mean_b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fast.m2, m2_b, rtol=1e-12, atol=1e-12)


def test_compiled_ratios_check_their_arguments():
    kernel = _C.ratio_stats_batch_f32
    dots = np.ones((5, 3, 4), np.float32)
    div = np.ones((5, 4), np.float32)
    hist = np.zeros((2, 12, 12), np.int64)
    b = np.zeros(5, np.int64)
    with pytest.raises(ValueError, match=r"blocks\[0\] must have dtype float32, got float64"):
        kernel([dots.astype(np.float64)], div, b, 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match=r"blocks\[1\] must have shape \[T, R, W\]=\[5, R, 4\], got \[5, 3, 3\]"):
        kernel([dots, np.ones((5, 3, 3), np.float32)], div, b, 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match=r"blocks\[0\] must have contiguous rows over its last two dimensions"):
        kernel([np.ones((5, 4, 3), np.float32).transpose(0, 2, 1)], div, b, 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match="blocks must hold at least one array"):
        kernel([], div, b, 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match=r"hist must have shape \[B, S, n_bins \+ 2\]=\[2, 24, 12\]"):
        kernel([dots, dots], div, b, 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match=r"bucket must lie in \[0, 2\), got -1 at token 0"):
        kernel([dots], div, np.full(5, -1, np.int64), 2, -1.0, 5.0, 10, hist)
    with pytest.raises(ValueError, match=r"divisor must have shape \[T, W\]"):
        kernel([dots], div[0], b, 2, -1.0, 5.0, 10, hist)
    assert not hist.any()  # nothing was written by a refused call
    kernel([dots[:, 1:2], dots[:, :2]], div, b, 2, -1.0, 5.0, 10, hist)  # a token-strided view is read in place
    assert hist.sum() == 5 * 3 * 4


def test_a_summary_is_not_changed_by_later_batches():
    """summary() of one bucket reads the live histogram without copying it; what it returns must still
    be its own: folding more values afterwards changes no earlier summary."""
    S, B = 5, 2
    stats = SeriesStats(S, B, -1.0, 1.0, 20)
    bucket = torch.zeros(7, dtype=torch.int64)
    stats.update(torch.full((7, S), -5.0), bucket)  # all in the underflow bin of bucket 0
    before = stats.summary([0])
    kept = {k: v.copy() for k, v in before.items()}
    stats.update(torch.full((7, S), 5.0), bucket)  # all in the overflow bin
    for k, v in kept.items():
        np.testing.assert_array_equal(before[k], v, err_msg=k)
    assert (stats.summary([0])["overflow"] == 7).all() and (before["overflow"] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_group_folds_like_its_members_alone(dtype):
    """SeriesGroup (the torch path's one pass over several statistics of the same series, each with its
    own range, bins and buckets) leaves every member in the state the compiled kernel leaves it in,
    over batches of tricky values: histograms, counts and NaN counts exactly, moments to 1e-12."""
    from erasure_fast.scanning.aggregate import SeriesGroup

    S, B = 23, 3
    shapes = [(B, -3.0, 3.0, 1200), (1, -1.0, 1.002, 1001), (B, -10.0, 10.0, 2000), (1, -100.05, 100.05, 2001)]
    grouped = [SeriesStats(S, b, lo, hi, nb) for b, lo, hi, nb in shapes]
    alone = [SeriesStats(S, b, lo, hi, nb) for b, lo, hi, nb in shapes]
    group = SeriesGroup(grouped)
    for T in (301, 1, 64):
        bucket = torch.randint(0, B, (T,), generator=torch.Generator().manual_seed(T))
        values = [_tricky_values(T, S, lo, hi, nb, dtype, seed=T + i) for i, (_, lo, hi, nb) in enumerate(shapes)]
        group.update(values, bucket)
        for one, v in zip(alone, values):  # the compiled kernel, one statistic at a time
            one.update(v, bucket if one.B > 1 else torch.zeros_like(bucket))
    for g, a in zip(grouped, alone):
        got, want = _running_state(g), _running_state(a)
        for k in ("count", "nan", "hist"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["m2"], want["m2"], rtol=1e-12, atol=1e-9)
        assert got["count"].sum() > 0 and got["nan"].sum() > 0
    with pytest.raises(ValueError, match="same series"):
        SeriesGroup([SeriesStats(3, 1, -1.0, 1.0, 10), SeriesStats(4, 1, -1.0, 1.0, 10)])
