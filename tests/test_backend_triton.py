"""The Triton backend and its kernels, checked on CPU under the Triton interpreter.

Every kernel (fused: GRAM and RECOMPUTE writers, split node/writer grid; DLA-only: gathered table and
fixed set) is compared with the float64 torch backend on small odd shapes, for fp32, bf16 and fp16
inputs, plus parity with TransformerLens through ``erasure_fast.attribute(..., backend="triton")``.

TRITON_INTERPRET: triton reads it when a ``@triton.jit`` decorator runs, i.e. at the first import of
``erasure_fast.kernels``; conftest.py sets it for the whole session on machines without a GPU, before
any test module is imported, and the backend never reloads its kernels.
`test_backend_reports_interpreter_and_cpu_device` checks that the kernels really are interpreted.
"""

from __future__ import annotations

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the install
    pytest.skip(f"triton not importable: {e}", allow_module_level=True)

import erasure_fast as ef
from conftest import build_model, record_error, rel_err
from erasure_fast.backends import torch_ref
from erasure_fast.contract import FusedOutputs, fused_attribution, validate

if torch.cuda.is_available():
    pytest.skip("a GPU is present: the kernels are compiled for it (tests/test_gpu.py), not interpreted on CPU",
                allow_module_level=True)

TOL32 = 1e-5  # fp32 accumulation vs float64 reference of the same (rounded) inputs
TOL_ROUNDING = 1e-2  # bf16 / fp16 inputs vs the unrounded float64 inputs


def kernels():
    from erasure_fast.backends import triton as tb

    return tb._kernels()


def make_case(T, N, H, D, M, W, K, mode, inc, seed, writers=None):
    """float64 inputs; mode is "gathered" (ids with -1) or "fixed"."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    z = torch.randn(T, N, H, **f64)
    W_O = torch.randn(N, H, D, **f64) / H ** 0.5
    dirs = torch.randn(K, D, **f64) + 0.3  # non-zero mean: centring matters
    scale = torch.rand(T, **f64) + 0.5
    # distinct heads: the public fused_attribution refuses a head named twice (repeats: run_fused, below)
    wr = torch.randperm(N, generator=g)[:W] if writers is None else torch.as_tensor(writers)
    extra = torch.randn(T, M, D, **f64) if M else None
    ids = incs = None
    if mode == "gathered":
        ids = torch.randint(0, K, (T,), generator=g)
        ids[::4] = -1  # "no target" rows -> NaN
        if inc:
            incs = torch.randint(0, K, (T,), generator=g)
            incs[1::5] = -1
    return dict(z=z, W_O=W_O, directions=dirs, scale=scale, writers=wr, extra_nodes=extra,
                direction_ids=ids, incorrect_ids=incs)


def cast(case, dtype):
    out = dict(case)
    for k in ("z", "W_O", "directions", "extra_nodes"):
        if out[k] is not None:
            out[k] = out[k].to(dtype)
    return out


def reference(case, center):
    """float64 torch backend on the given values (upcast if rounded)."""
    return torch_ref.run(validate(**cast(case, torch.float64), center=center))


def compare(ours, ref, check, dtype, tol):
    errs = {}
    for name in ("dla", "dots", "norms"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == torch.float32 and a.shape == b.shape, (name, a.dtype, a.shape, b.shape)
        err = rel_err(a, b) if b.numel() else 0.0
        record_error(f"{check} {name}", dtype, "triton", err)
        errs[name] = err
    assert max(errs.values()) < tol, errs
    return errs


def run_fused(case, center, dtype=torch.float32, **kw):
    """The fused launcher (+ dla_fixed in fixed mode), as the backend calls it, with forced options
    (the launcher's private test seam `_launch`; the public `fused_attribution` takes none)."""
    fa, dt = kernels()
    inp = validate(**cast(case, dtype), center=center)
    dla, dots, norms = fa._launch(inp.z, inp.W_O, inp.directions, inp.scale, inp.writers,
                                            inp.extra_nodes, inp.direction_ids, inp.incorrect_ids, inp.center, **kw)
    if dla is None:
        dla = dt.dla_fixed(inp.z, inp.W_O, inp.directions, inp.scale, inp.center)
    return FusedOutputs(dla, dots, norms)


# ------------------------------------------------------------------ fused kernel, fp32

SHAPES = [(1, 1, 5, 13), (5, 3, 16, 40), (19, 6, 5, 13), (19, 6, 16, 40)]  # T, N, d_head, d_model
DIRS = [("gathered", False, 3), ("gathered", True, 3), ("fixed", False, 1), ("fixed", False, 3)]
FUSED = [(s, M, W, d, c) for s in SHAPES for M in (0, 2) for W in (1, 3) for d in DIRS for c in (True, False)]
# keep the count bounded: every shape x M x W, directions and centring rotate
FUSED = [f for i, f in enumerate(FUSED) if i % 4 in (0, 3)]


@pytest.mark.parametrize("shape,M,W,dirs,center", FUSED)
def test_fused_fp32(shape, M, W, dirs, center):
    T, N, H, D = shape
    mode, inc, K = dirs
    case = make_case(T, N, H, D, M, W, K, mode, inc, seed=T * 100 + N * 10 + M + W)
    ref = reference(case, center)
    for wmode in ("gram", "recompute"):
        ours = run_fused(case, center, mode=wmode)
        compare(ours, ref, f"fused {wmode} {mode}{' logit-diff' if inc else ''}", torch.float32, TOL32)


def test_fused_identity_writers_and_duplicates():
    """writers == all heads in order (no column selection), and repeated / permuted writers."""
    case = make_case(19, 6, 16, 40, 2, 6, 3, "gathered", True, seed=7, writers=list(range(6)))
    ref = reference(case, True)
    fa, _ = kernels()
    assert fa.plan(6, 16, 2, case["writers"])["WR_IDENTITY"]
    compare(run_fused(case, True), ref, "fused identity writers", torch.float32, TOL32)
    case = make_case(19, 6, 16, 40, 2, 0, 3, "gathered", False, seed=8, writers=[5, 0, 5, 2])
    ref = reference(case, True)
    for wmode in ("gram", "recompute"):
        compare(run_fused(case, True, mode=wmode), ref, f"fused {wmode} duplicate writers", torch.float32, TOL32)


@pytest.mark.parametrize("mode", ["gathered", "fixed"])
def test_fused_split_grid(mode):
    """N and W above the (lowered) block limit: node blocks x writer blocks, RECOMPUTE."""
    case = make_case(19, 19, 8, 20, 2, 18, 3, mode, mode == "gathered", seed=9)
    ref = reference(case, True)
    fa, _ = kernels()
    p = fa._plan(19, 8, 2, case["writers"], max_block=16)
    assert p["n_blocks"] == 2 and p["w_blocks"] == 2 and not p["GRAM"]
    compare(run_fused(case, True, max_block=16), ref, f"fused split grid {mode}", torch.float32, TOL32)
    compare(run_fused(case, True, block_sizes=dict(BLOCK_T=32, BLOCK_D=32, BLOCK_H=32)), ref,
            f"fused big blocks {mode}", torch.float32, TOL32)


# ------------------------------------------------------------------ DLA-only kernels, fp32

DLA_ONLY = [(s, d, c) for s in SHAPES for d in DIRS for c in (True, False)]
DLA_ONLY = [f for i, f in enumerate(DLA_ONLY) if i % 2 == 0 or f[0][0] == 19]


@pytest.mark.parametrize("shape,dirs,center", DLA_ONLY)
def test_dla_only_fp32(shape, dirs, center):
    T, N, H, D = shape
    mode, inc, K = dirs
    case = make_case(T, N, H, D, 0, 0, K, mode, inc, seed=T + N + H + K)
    ref = reference(case, center)
    ours = fused_attribution(**case_f32(case), center=center, backend="triton")
    compare(ours, ref, f"dla-only {mode}{' logit-diff' if inc else ''}", torch.float32, TOL32)


def case_f32(case):
    return cast(case, torch.float32)


def test_no_writers_with_extra_nodes():
    case = make_case(19, 6, 16, 40, 2, 0, 3, "gathered", True, seed=11)
    ref = reference(case, True)
    compare(fused_attribution(**case_f32(case), backend="triton"), ref, "W=0 with extras", torch.float32, TOL32)


# ------------------------------------------------------------------ bf16 / fp16 inputs

LOW = [
    ((19, 6, 16, 40), 2, 3, ("gathered", True, 3), True),
    ((5, 3, 5, 13), 0, 1, ("fixed", False, 3), True),
    ((19, 6, 16, 40), 0, 0, ("gathered", False, 3), False),
    ((19, 6, 5, 13), 2, 0, ("fixed", False, 1), True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,M,W,dirs,center", LOW)
def test_low_precision_inputs(dtype, shape, M, W, dirs, center):
    T, N, H, D = shape
    mode, inc, K = dirs
    case = make_case(T, N, H, D, M, W, K, mode, inc, seed=5 + M + W)
    rounded = cast(case, dtype)
    ours = fused_attribution(**rounded, center=center, backend="triton")
    # fp32 accumulation: matches float64 math on the same rounded values
    compare(ours, reference(rounded, center), f"{mode} W={W} M={M} vs rounded inputs", dtype, TOL32)
    # and the unrounded float64 inputs up to the input rounding
    compare(ours, reference(case, center), f"{mode} W={W} M={M} vs unrounded inputs", dtype, TOL_ROUNDING)


# ------------------------------------------------------------------ backend plumbing

def test_backend_reports_interpreter_and_cpu_device():
    info = ef.available_backends()["triton"]
    assert info.available and "interpreter" in info.detail, info
    from erasure_fast.backends import triton as tb

    assert tb.DEVICES == ("cuda", "cpu")
    fa, dt = kernels()
    assert fa.INTERPRET and dt.INTERPRET
    assert type(fa._fused_attribution_kernel).__name__ == "InterpretedFunction"


def test_float64_is_rejected_with_a_pointer_to_other_backends():
    case = make_case(5, 3, 5, 13, 0, 1, 3, "gathered", False, seed=1)
    with pytest.raises(ValueError, match="backend='torch' or backend='cpp'"):
        fused_attribution(**case, backend="triton")


# ------------------------------------------------------------------ TransformerLens parity

def pr_reference(nodes, writers):
    a, w = nodes.double(), writers.double()
    dots = torch.einsum("abpd,wbpd->bpaw", a, w)
    ww = (w * w).sum(-1).permute(1, 2, 0)[:, :, None, :]
    return torch.where(ww == 0, torch.full_like(dots, float("nan")), dots / ww)


def head_major(dla):
    B, P = dla.shape[:2]
    return dla.reshape(B, P, -1).permute(2, 0, 1)


@pytest.mark.parametrize("compat", [False, True])
def test_attribute_matches_transformer_lens(compat):
    model = build_model(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, compat=compat, seed=4)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (2, 7), generator=g)
    _, cache = model.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, apply_ln=False)
    L = model.cfg.n_layers
    mlp = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])
    resid = [cache["blocks.0.hook_resid_pre"]]
    for l in range(L):
        resid += [cache[f"blocks.{l}.hook_resid_mid"], cache[f"blocks.{l}.hook_resid_post"]]
    resid = torch.stack(resid)
    tag = "compat" if compat else "raw"

    res = ef.attribute(model, tokens, backend="triton")
    assert res.backend == "triton"
    nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    ref = cache.logit_attrs(stack, nxt)
    ours = head_major(res.dla)
    assert torch.isnan(ours[:, :, -1]).all()
    checks = {
        "dla next-token": (ours[:, :, :-1], ref[:, :, :-1], 2e-5),
        "pr": (res.pr, pr_reference(torch.cat([stack, mlp]), stack), 2e-5),
        "resid_pr": (res.resid_pr, pr_reference(resid, stack), 2e-4),
    }
    # logit difference with per-position targets, two writers (fused kernel, GRAM with column selection)
    corr = torch.randint(0, 50, (2, 7), generator=g)
    wrong = torch.randint(0, 50, (2, 7), generator=g)
    res2 = ef.attribute(model, tokens, targets=corr, incorrect=wrong, writers=["L0H2", (1, 1)], backend="triton")
    checks["dla logit difference"] = (head_major(res2.dla), cache.logit_attrs(stack, corr, incorrect_tokens=wrong), 2e-5)
    for name, (a, b, tol) in checks.items():
        err = rel_err(a, b)
        record_error(f"TL parity {name} ({tag})", torch.float32, "triton", err)
        assert err < tol, (name, err)


def test_the_plan_reads_the_writers_on_the_host():
    """The contract hands the backend the writers on the host too (`FusedInputs.writers_host`): the
    launcher plans from them (every head as writers in order: the GRAM identity), never from the
    device copy, which on a GPU it would have to read back at every call."""
    from host_reads import HostReads

    fa, _ = kernels()
    case = make_case(7, 5, 8, 12, 2, 5, 3, "gathered", False, seed=4, writers=list(range(5)))
    inp = validate(**case_f32(case), center=True)
    assert inp.writers_host is not None and inp.writers_host.device.type == "cpu"
    assert torch.equal(inp.writers_host, inp.writers.cpu())
    with HostReads(host=[inp.writers_host]) as reads:
        plan = fa._plan(5, 8, 2, inp.writers_host)
    assert plan["WR_IDENTITY"] and reads.total == 0, reads.count
    on_device = inp.writers.clone()  # a copy, as on a GPU: planning from it reads it back
    with HostReads(host=[inp.writers_host]) as reads:
        fa._plan(5, 8, 2, on_device)
    assert reads.total > 0
    ours = fused_attribution(**case_f32(case), center=True, backend="triton")
    compare(ours, reference(case, True), "fused, writers planned on the host", torch.float32, TOL32)


def test_a_scan_on_the_triton_backend_takes_the_gpu_paths(tmp_path, monkeypatch):
    """A scan on the Triton backend along every path it takes on a GPU (the torch aggregation, checks
    deferred to checkpoints, writers planned on the host) aggregates what the torch backend's does:
    the same counts, the histograms within a few values that fp32 rounding moves across a bin edge,
    means to fp32 rounding."""
    import numpy as np

    import erasure_fast.attribution as attribution
    import erasure_fast.scanning.aggregate as aggregate
    import erasure_fast.scanning.job as job
    import erasure_fast.scanning.pair_stats as pair_stats
    from erasure_fast.scanning import checkpoint as ckpt
    from erasure_fast.scanning import scan

    monkeypatch.setattr(aggregate, "scan_kernel", lambda name, values: None)
    monkeypatch.setattr(pair_stats, "scan_kernel", lambda name, values: None)
    monkeypatch.setattr(attribution, "reads_back_freely", lambda device: False)
    monkeypatch.setattr(job, "reads_back_freely", lambda device: False)
    model = build_model(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64, seed=7)
    corpus = tmp_path / "tokens.npy"
    np.save(corpus, np.random.default_rng(3).integers(0, 50, size=23 * 16).astype(np.uint16))
    states = {}
    for backend in ("triton", "torch"):
        res = scan(model, str(corpus), out_dir=str(tmp_path / backend), seq_len=16, batch_size=4, progress=False,
                   report=False, backend=backend, writers="all")
        assert res.meta["backend"] == backend and res.meta["tokens"] == 23 * 16
        states[backend] = ckpt.load(str(tmp_path / backend / "checkpoint" / "rank0-of-1.npz"))[0]
    a, b = states["triton"], states["torch"]
    for key in a:
        if key.endswith((".count", ".nan")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        elif key.endswith(".hist"):
            assert np.abs(a[key] - b[key]).sum() <= 2e-3 * b[key].sum() + 2, key
        elif key.endswith(".mean"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert b["pr.hist"].sum() > 0
