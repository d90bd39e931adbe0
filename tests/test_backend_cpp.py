"""The C++ backend (erasure_fast._C via erasure_fast.backends.cpp) against the float64 torch oracle.

Skipped as a whole only when the extension is not built (e.g. running from a source tree without
`pip install .`).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from erasure_fast.backends import cpp, torch_ref
from erasure_fast.contract import FusedInputs, fused_attribution, validate

_ok, _why = cpp.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"cpp backend unavailable: {_why}")
if _ok:
    from erasure_fast import _C

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# norm-relative tolerances: max|a - b| / max(max|b|, Cauchy-Schwarz magnitude), see rel_err
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


# ---------------------------------------------------------------------------------------------
# helpers
def make_case(
    T, N, H, D, M, W, K, *, dtype=torch.float32, mode="gathered", incorrect=False, missing=False,
    center=True, seed=0,
):
    """Random raw arguments for `validate` / `fused_attribution`."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    z = rnd(T, N, H)
    W_O = rnd(N, H, D, s=H ** -0.5)
    directions = rnd(K, D) + 0.3  # non-zero mean, so centring matters
    scale = torch.rand(T, generator=g, dtype=torch.float64) * 2 + 0.5
    writers = torch.randint(0, N, (W,), generator=g)
    extra = rnd(T, M, D) if M else None
    kw = dict(center=center)
    if mode == "gathered":
        ids = torch.randint(0, K, (T,), generator=g)
        if missing:
            ids[torch.rand(T, generator=g) < 0.3] = -1
        kw["direction_ids"] = ids
        if incorrect:
            inc = torch.randint(0, K, (T,), generator=g)
            if missing:
                inc[torch.rand(T, generator=g) < 0.2] = -1
            kw["incorrect_ids"] = inc
    return (z, W_O, directions, scale, writers, extra), kw


def as_f64(inp: FusedInputs) -> FusedInputs:
    """The same (already rounded) inputs in float64: the oracle's view of them."""
    def f(t):
        return t.to(torch.float64)

    return FusedInputs(
        z=f(inp.z), W_O=f(inp.W_O), directions=f(inp.directions), scale=f(inp.scale),
        writers=inp.writers, extra_nodes=f(inp.extra_nodes), direction_ids=inp.direction_ids,
        incorrect_ids=inp.incorrect_ids, center=inp.center,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max|a - b| / max(max|b|, floor) over finite entries; asserts shapes and NaN patterns match.

    ``floor`` is the Cauchy-Schwarz magnitude of the sums (see `magnitudes`): a few outputs that
    cancel to nearly 0 (tiny T x N) would otherwise turn rounding into a large "relative" error.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), "NaN patterns differ"
    if a.numel() == 0 or bool(na.all()):
        return 0.0
    a = a[~na].to(torch.float64)
    b = b[~nb].to(torch.float64)
    diff = float((a - b).abs().max())
    ref = max(float(b.abs().max()), floor)
    return diff / ref if ref > 0 else diff


def magnitudes(inp: FusedInputs, want) -> dict:
    """Upper bounds of |output| (Cauchy-Schwarz): |r.c(d)|/s <= |r| 2 max|dir| / min s, |a.w| <= max|node|^2."""
    N = inp.z.shape[1]
    nmax = float(want.norms.max())
    rmax = float(want.norms[:, :N].max()) ** 0.5
    dmax = 2 * float(inp.directions.to(torch.float64).norm(dim=1).max())
    return {"dla": rmax * dmax / float(inp.scale.min()), "dots": nmax, "norms": nmax}


_worst: dict = {}


def check_against_oracle(args, kw, dtype):
    inp = validate(*args, **kw)
    got = cpp.run(inp)
    want = torch_ref.run(as_f64(inp))
    assert got.dla.dtype == inp.out_dtype == got.dots.dtype == got.norms.dtype
    floor = magnitudes(inp, want)
    for name in ("dla", "dots", "norms"):
        e = rel_err(getattr(got, name), getattr(want, name), floor[name])
        _worst[dtype] = max(_worst.get(dtype, 0.0), e)
        assert e <= TOL[dtype], f"{name}: rel err {e:.3g} > {TOL[dtype]:.1g} ({dtype})"
    return got, want


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    if _worst:
        print("\nworst norm-relative error per dtype:", {str(k): f"{v:.3g}" for k, v in _worst.items()})


# ---------------------------------------------------------------------------------------------
# fixed grids of odd shapes
SHAPES = [  # T, N, H, D, M, W, K
    (1, 1, 3, 13, 0, 0, 1),
    (1, 5, 24, 120, 2, 3, 4),
    (7, 1, 64, 13, 2, 1, 1),
    (7, 5, 3, 120, 0, 3, 4),
    (37, 5, 24, 13, 2, 3, 4),
    (37, 1, 64, 120, 0, 1, 4),
    (37, 5, 64, 120, 2, 0, 1),
    (13, 5, 24, 16, 2, 3, 4),  # d_model a multiple of the SIMD block: no padding path
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}N{}H{}D{}M{}W{}K{}".format(*s))
@pytest.mark.parametrize(
    "mode,incorrect,missing",
    [("gathered", False, False), ("gathered", True, False), ("gathered", False, True),
     ("gathered", True, True), ("fixed", False, False)],
)
@pytest.mark.parametrize("center", [True, False])
def test_matches_oracle(dtype, shape, mode, incorrect, missing, center):
    seed = zlib.crc32(repr((shape, mode, incorrect, missing, center)).encode())  # stable across runs
    args, kw = make_case(*shape, dtype=dtype, mode=mode, incorrect=incorrect, missing=missing,
                         center=center, seed=seed)
    got, want = check_against_oracle(args, kw, dtype)
    T, N = shape[0], shape[1]
    if mode == "gathered":
        assert got.dla.shape == (T, N)
        ids = kw["direction_ids"]
        bad = ids < 0
        if incorrect:
            bad = bad | (kw["incorrect_ids"] < 0)
        assert torch.equal(torch.isnan(got.dla).all(1), bad)
        assert not torch.isnan(got.dla[~bad]).any()
    else:
        assert got.dla.shape == (T, N, shape[6])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["gathered", "fixed"])
def test_half_inputs_accumulate_in_fp32(dtype, mode):
    args, kw = make_case(37, 5, 24, 120, 2, 3, 4, dtype=dtype, mode=mode, incorrect=True, missing=True)
    got, _ = check_against_oracle(args, kw, dtype)
    assert got.dla.dtype == torch.float32


def test_public_entry_point_and_auto():
    args, kw = make_case(9, 4, 8, 40, 1, 2, 5, dtype=torch.float32)
    a = fused_attribution(*args, **kw, backend="cpp")
    b = fused_attribution(*args, **kw, backend="torch")
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-5
    c = fused_attribution(*args, **kw, backend="auto")
    for x, y in zip(a, c):
        assert x.numpy().tobytes() == y.numpy().tobytes()


def test_per_token_directions_and_next_token_shape():
    # per-token directions [T, D] are the gathered mode with ids = arange(T)
    args, kw = make_case(11, 3, 8, 24, 0, 2, 11, dtype=torch.float64)
    kw["direction_ids"] = torch.arange(11)
    check_against_oracle(args, kw, torch.float64)


def test_zero_writer_output_gives_zero_norm():
    args, kw = make_case(5, 3, 8, 24, 0, 2, 4, dtype=torch.float32)
    z = args[0].clone()
    z[2, 1] = 0  # head 1 writes nothing at token 2
    args = (z,) + args[1:4] + (torch.tensor([1, 0]),) + args[5:]
    got, _ = check_against_oracle(args, kw, torch.float32)
    assert got.norms[2, 1] == 0 and (got.dots[2, :, 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# property test over random shapes, dtypes and modes
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 40), N=st.integers(1, 7), H=st.integers(1, 40), D=st.integers(1, 70),
    M=st.integers(0, 3), W=st.integers(0, 4), K=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    mode=st.sampled_from(["gathered", "fixed"]), incorrect=st.booleans(), missing=st.booleans(),
    center=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_oracle(T, N, H, D, M, W, K, dtype, mode, incorrect, missing, center, seed):
    args, kw = make_case(T, N, H, D, M, W, K, dtype=dtype, mode=mode, incorrect=incorrect,
                         missing=missing, center=center, seed=seed)
    check_against_oracle(args, kw, dtype)


# ---------------------------------------------------------------------------------------------
# determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["gathered", "fixed"])
def test_thread_count_independent_bitwise(dtype, mode):
    args, kw = make_case(101, 6, 24, 77, 2, 3, 5, dtype=dtype, mode=mode, incorrect=True, missing=True)
    inp = validate(*args, **kw)
    outs = []
    try:
        for n in (1, 2, 3):
            cpp.set_num_threads(n)
            outs.append(cpp.run(inp))
    finally:
        cpp.set_num_threads(None)
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert x.numpy().tobytes() == y.numpy().tobytes()


def test_tile_size_does_not_change_results():
    args, kw = make_case(50, 4, 16, 40, 1, 2, 3, dtype=torch.float32, incorrect=True)
    inp = validate(*args, **kw)
    np_args = [inp.z.numpy(), inp.W_O.numpy(), inp.directions.numpy(), inp.scale.numpy(),
               inp.writers.numpy(), inp.extra_nodes.numpy()]
    kws = dict(direction_ids=inp.direction_ids.numpy(), incorrect_ids=inp.incorrect_ids.numpy())
    ref = _C.fused_attribution_f32(*np_args, **kws)
    for tile in (1, 6, 7, 48, 1000):
        out = _C.fused_attribution_f32(*np_args, **kws, tile_tokens=tile)
        for x, y in zip(ref, out):
            assert x.tobytes() == y.tobytes()


def test_env_var_threads(monkeypatch):
    monkeypatch.setenv(cpp.ENV_THREADS, "1")
    assert cpp.get_num_threads() == 1
    cpp.set_num_threads(2)
    try:
        assert cpp.get_num_threads() == 2
    finally:
        cpp.set_num_threads(None)
    monkeypatch.delenv(cpp.ENV_THREADS)
    assert cpp.get_num_threads() == 0


def test_build_info():
    info = _C.build_info()
    assert set(info) >= {"openmp", "max_threads", "cpu_arch", "compiler"}
    assert info["cpu_arch"] in ("native", "avx2", "portable")
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1


# ---------------------------------------------------------------------------------------------
# binding-level argument checks (defence in depth: Python validates first)
def _good(T=4, N=3, H=5, D=7, K=4, M=2, W=2):
    rng = np.random.default_rng(0)
    f = np.float32
    return dict(
        z=rng.standard_normal((T, N, H)).astype(f),
        W_O=rng.standard_normal((N, H, D)).astype(f),
        directions=rng.standard_normal((K, D)).astype(f),
        scale=np.ones(T, f),
        writers=np.arange(W, dtype=np.int64),
        extra_nodes=rng.standard_normal((T, M, D)).astype(f),
        direction_ids=np.zeros(T, np.int64),
    )


def test_binding_accepts_good_arguments():
    dla, dots, norms = _C.fused_attribution_f32(**_good())
    assert dla.shape == (4, 3) and dots.shape == (4, 5, 2) and norms.shape == (4, 5)
    a = _good()
    del a["direction_ids"], a["extra_nodes"]
    dla, dots, norms = _C.fused_attribution_f32(**a)
    assert dla.shape == (4, 3, 4) and dots.shape == (4, 3, 2) and norms.shape == (4, 3)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=np.zeros((4, 3), np.float32)), "z must have shape"),
        (dict(W_O=np.zeros((3, 6, 7), np.float32)), "W_O must have shape"),
        (dict(W_O=np.zeros((2, 5, 7), np.float32)), "W_O must have shape"),
        (dict(directions=np.zeros((4, 8), np.float32)), "directions must have shape"),
        (dict(directions=np.zeros((0, 7), np.float32)), "K = 0"),
        (dict(scale=np.ones(5, np.float32)), "scale must have shape"),
        (dict(scale=np.zeros(4, np.float32)), "scale must be finite and > 0"),
        (dict(writers=np.array([0, 3], np.int64)), "writers must be head indices"),
        (dict(writers=np.array([-1], np.int64)), "writers must be head indices"),
        (dict(extra_nodes=np.zeros((4, 2, 6), np.float32)), "extra_nodes must have shape"),
        (dict(extra_nodes=np.zeros((3, 2, 7), np.float32)), "extra_nodes must have shape"),
        (dict(direction_ids=np.zeros(3, np.int64)), "direction_ids must have shape"),
        (dict(direction_ids=np.array([0, 1, 4, 0], np.int64)), r"direction_ids must lie in \[-1, 4\)"),
        (dict(direction_ids=np.array([0, -2, 0, 0], np.int64)), "direction_ids must lie in"),
        (dict(incorrect_ids=np.array([0, 0, 0, 9], np.int64)), "incorrect_ids must lie in"),
        (dict(direction_ids=None, incorrect_ids=np.zeros(4, np.int64)), "incorrect_ids needs direction_ids"),
    ],
)
def test_binding_rejects_bad_arguments(change, match):
    a = _good()
    a.update(change)
    with pytest.raises(ValueError, match=match):
        _C.fused_attribution_f32(**a)


def test_binding_rejects_wrong_dtype():
    a = _good()
    a["z"] = a["z"].astype(np.float64)  # float64 -> float32 is not a safe cast
    with pytest.raises(TypeError):
        _C.fused_attribution_f32(**a)
