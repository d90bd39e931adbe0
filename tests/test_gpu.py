"""GPU correctness at real sizes (GELU-4L shape, 8192 tokens): Triton and the torch backend on CUDA
against the float64 torch backend. Runs on a machine with a CUDA GPU (benchmarks/device_check.sh)."""

from __future__ import annotations

import pytest
import torch

import erasure_fast as ef
from erasure_fast.backends import torch_ref
from erasure_fast.contract import validate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

N, H, D, M, V, T = 32, 64, 512, 4, 48262, 8192


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    f = torch.isfinite(b)
    return float((a[f] - b[f]).abs().max() / b[f].abs().max())


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(T, N, H, generator=g)
    W_O = torch.randn(N, H, D, generator=g) * 0.035
    dirs = torch.randn(V, D, generator=g) * 0.035
    scale = torch.rand(T, generator=g) + 0.5
    extra = torch.randn(T, M, D, generator=g)
    ids = torch.randint(-1, V, (T,), generator=g)
    return dict(z=z, W_O=W_O, directions=dirs, scale=scale, extra_nodes=extra, direction_ids=ids)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k1_on_gpu_matches_float64(case, backend, dtype):
    if backend == "triton" and not ef.available_backends()["triton"].available:
        pytest.skip(ef.available_backends()["triton"].detail)
    dev = torch.device("cuda")
    args = {k: (v.to(dtype) if v.is_floating_point() and k != "scale" else v).to(dev) for k, v in case.items()}
    out = ef.fused_attribution(**args, writers=list(range(N)), backend=backend)
    ref64 = {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in case.items()}
    ref = torch_ref.run(validate(**{k: v.to(dev) for k, v in ref64.items()}, writers=list(range(N))))
    tol = 2e-5 if dtype == torch.float32 else 2e-5  # fp32 accumulation of the same rounded inputs
    for name in ("dla", "dots", "norms"):
        assert rel(getattr(out, name), getattr(ref, name)) < tol, name


def test_dla_only_paths_on_gpu(case):
    if not ef.available_backends()["triton"].available:
        pytest.skip(ef.available_backends()["triton"].detail)
    dev = torch.device("cuda")
    a = {k: v.to(dev) for k, v in case.items() if k != "extra_nodes"}
    out = ef.fused_attribution(**a, writers=[], backend="triton", with_norms=False)
    ref = torch_ref.run(validate(**{k: (v.double() if v.is_floating_point() else v) for k, v in a.items()}, writers=[]))
    assert rel(out.dla, ref.dla) < 2e-5
    pair = (case["directions"][5] - case["directions"][7])[None].to(dev)
    out = ef.fused_attribution(a["z"], a["W_O"], pair, a["scale"], [], backend="triton", with_norms=False)
    ref = torch_ref.run(validate(a["z"].double(), a["W_O"].double(), pair.double(), a["scale"].double(), []))
    assert rel(out.dla, ref.dla) < 2e-5


def test_scan_aggregates_on_gpu_equal_the_cpu_ones():
    """A batch on the GPU is folded there (torch reference; only moments and top-k rows cross to the
    host): the same histograms, counts and top-k entries as the same values folded on the CPU."""
    from erasure_fast.scanning.aggregate import SeriesStats, TopK

    g = torch.Generator().manual_seed(3)
    S, B, T = 301, 3, 40_000
    v = torch.randn(T, S, generator=g) * 2
    v[torch.rand(T, S, generator=g) < 0.02] = float("nan")
    bucket = torch.randint(0, B, (T,), generator=g)
    cpu, gpu = SeriesStats(S, B, -3.0, 3.0, 1200), SeriesStats(S, B, -3.0, 3.0, 1200)
    for lo in range(0, T, 9_999):
        cpu.update(v[lo:lo + 9_999], bucket[lo:lo + 9_999])
        gpu.update(v[lo:lo + 9_999].cuda(), bucket[lo:lo + 9_999].cuda())
    for k in ("count", "nan", "hist"):
        assert (getattr(cpu, k) == getattr(gpu, k)).all(), k
    assert abs(cpu.mean - gpu.mean).max() <= 1e-12 * abs(cpu.mean).max()
    assert abs(cpu.m2 - gpu.m2).max() <= 1e-12 * abs(cpu.m2).max()
    score = torch.randn(T, 7, generator=g)
    rows, pos, pay = torch.arange(T) // 100, torch.arange(T) % 100, torch.randn(T, 7, 3, generator=g)
    a, b = TopK(7, 11, payload=3), TopK(7, 11, payload=3)
    a.update(score, rows, pos, pay)
    b.update(score.cuda(), rows.cuda(), pos.cuda(), pay.cuda())
    for k in ("score", "row", "pos", "payload"):
        assert (getattr(a, k) == getattr(b, k)).all(), k


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_scan_batch_on_gpu_never_synchronises(tmp_path, backend):
    """After its first batch (Triton compiles, caches fill), no batch of a scan on the GPU makes the
    host wait: CUDA's sync debug mode turns any synchronising call (a read-back, a copy from pageable
    memory, a data-dependent shape) into an error; the checkpoint and summary are outside the batches.
    The scan's counts equal the same scan's on the CPU, its DLA means to fp32 rounding."""
    if backend == "triton" and not ef.available_backends()["triton"].available:
        pytest.skip(ef.available_backends()["triton"].detail)
    import numpy as np

    import erasure_fast.scanning.job as job
    from conftest import build_model
    from erasure_fast.scanning import checkpoint as ckpt
    from erasure_fast.scanning import scan

    model = build_model(n_layers=2, n_heads=4, d_head=16, d_model=64, d_mlp=128, d_vocab=300, n_ctx=128, seed=1)
    corpus = tmp_path / "tokens.npy"
    np.save(corpus, np.random.default_rng(0).integers(0, 300, size=64 * 128).astype(np.uint16))
    batches = []
    scan_batch = job.ScanJob._scan_batch

    def strict(self, b, row_ids, toks):
        if batches:
            torch.cuda.set_sync_debug_mode("error")
        try:
            scan_batch(self, b, row_ids, toks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        batches.append(b)

    job.ScanJob._scan_batch = strict
    try:
        scan(model.cuda(), str(corpus), out_dir=str(tmp_path / "gpu"), seq_len=128, batch_size=8, progress=False,
             report=False, backend=backend)
    finally:
        job.ScanJob._scan_batch = scan_batch
    assert len(batches) == 8
    scan(model.cpu(), str(corpus), out_dir=str(tmp_path / "cpu"), seq_len=128, batch_size=8, progress=False,
         report=False, backend="torch")
    a = ckpt.load(str(tmp_path / "gpu" / "checkpoint" / "rank0-of-1.npz"))[0]
    b = ckpt.load(str(tmp_path / "cpu" / "checkpoint" / "rank0-of-1.npz"))[0]
    for key in ("pr.count", "pr.nan", "dla.count", "pair.es.count"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_allclose(a["dla.mean"], b["dla.mean"], rtol=1e-4, atol=1e-6)
