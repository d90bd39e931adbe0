"""The C++ backend (erasure_fast._C via erasure_fast.backends.cpp) against the float64 torch oracle.

Skipped as a whole only when the extension is not built (e.g. running from a source tree without
`pip install .`).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

from erasure_fast.backends import cpp, torch_ref
from erasure_fast.backends.dla_table import build_dla_table
from erasure_fast.contract import FusedInputs, fused_attribution, validate
from conftest import TOL_AMX_BF16

_ok, _why = cpp.available()
# every test once per kernel path this CPU runs (conftest.each_cpu_path)
pytestmark = [pytest.mark.skipif(not _ok, reason=f"cpp backend unavailable: {_why}"),
              pytest.mark.usefixtures("each_cpu_path")]
if _ok:
    from erasure_fast import _C

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# norm-relative tolerances: max|a - b| / max(max|b|, Cauchy-Schwarz magnitude), see rel_err
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# (the amx path's bfloat16 kernel: conftest.TOL_AMX_BF16)


def tol(dtype) -> float:
    if dtype == torch.bfloat16 and cpp.build_info()["cpu_path"] == "amx":
        return TOL_AMX_BF16
    return TOL[dtype]


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
        assert e <= tol(dtype), f"{name}: rel err {e:.3g} > {tol(dtype):.1g} ({dtype})"
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D,chunk", [(40, 16), (70, 24), (1100, 0), (1100, 512), (33, 1)],
                         ids=lambda v: str(v))
def test_d_model_passes_match_oracle(dtype, D, chunk):
    # the kernel projects d_model in passes of chunk_cols columns (default: one pass up to 1024)
    args, kw = make_case(29, 5, 12, D, 2, 6, 3, dtype=dtype, incorrect=True, missing=True)
    inp = validate(*args, **kw)
    out = getattr(_C, f"fused_attribution_{'f64' if dtype == torch.float64 else 'f32'}")(
        inp.z.numpy(), inp.W_O.numpy(), inp.directions.numpy(), inp.scale.numpy(),
        inp.writers.numpy(), inp.extra_nodes.numpy(), direction_ids=inp.direction_ids.numpy(),
        incorrect_ids=inp.incorrect_ids.numpy(), chunk_cols=chunk)
    want = torch_ref.run(as_f64(inp))
    floor = magnitudes(inp, want)
    for name, x in zip(("dla", "dots", "norms"), out):
        assert rel_err(torch.from_numpy(x), getattr(want, name), floor[name]) < TOL[dtype], name


def test_writer_gram_block_is_symmetric_and_complete():
    # writers in scrambled order with repeats: the kernel computes the writer-writer dots once
    # (upper triangle by first position) and copies the rest; every entry must still be right
    args, kw = make_case(31, 7, 16, 50, 2, 0, 3, dtype=torch.float64, incorrect=True)
    writers = torch.tensor([5, 2, 5, 0, 6, 2, 3, 1, 4, 0])
    args = args[:4] + (writers,) + args[5:]
    got, want = check_against_oracle(args, kw, torch.float64)
    pos = {int(h): i for i, h in reversed(list(enumerate(writers)))}  # first position of each head
    for i, a in enumerate(writers.tolist()):
        for j, b in enumerate(writers.tolist()):
            assert torch.equal(got.dots[:, a, j], got.dots[:, b, pos[a]]) or i == j
    assert torch.equal(got.norms[:, :7], torch.stack([got.dots[:, h, pos[h]] for h in range(7)], 1))


@pytest.mark.parametrize("suffix", ["bf16", "f16"])
def test_half_entry_points_take_bits_only(suffix):
    # bf16 / fp16 arrive as uint16 bits; a float array must not be cast to uint16 silently
    fn = getattr(_C, f"fused_attribution_{suffix}")
    z = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(TypeError):
        fn(z, np.zeros((1, 3, 4), np.uint16), np.zeros((2, 4), np.uint16),
           np.ones(2, np.float32), np.zeros(0, np.int64))


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
    assert set(info) >= {"openmp", "max_threads", "cpu_arch", "cpu_path", "best_cpu_path", "cpu_paths", "simd",
                         "compiler", "mapped_output_bytes"}
    assert info["cpu_arch"] in ("dispatch", "portable")
    assert info["cpu_path"] in info["cpu_paths"] and "portable" in info["cpu_paths"]
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1


# ---------------------------------------------------------------------------------------------
# large outputs: blocks of the scratch pool, mapped up front (csrc/output_buffers.h, csrc/scratch_pool.h)
def _mapped_from():
    mapped = _C.build_info()["mapped_output_bytes"]
    if mapped is None:
        pytest.skip("this build never maps outputs up front (AddressSanitizer)")
    return mapped


def _is_mapped(a: np.ndarray) -> bool:
    """Memory numpy does not own and whose owner is a capsule: the mapped allocation."""
    return not a.flags.owndata and type(a.base).__name__ == "PyCapsule"


@pytest.mark.parametrize("mode", ["gathered", "fixed"])
def test_outputs_from_the_mapped_size_match_oracle(mode):
    mapped = _mapped_from()
    # dots [T, N + M, W] float32 just above the size, dla and norms below it; odd sizes throughout
    T, N, H, D, M, W, K = 1031, 33, 8, 21, 3, 31, 5
    assert T * (N + M) * W * 4 >= mapped > T * (N + M) * 4
    args, kw = make_case(T, N, H, D, M, W, K, mode=mode, incorrect=mode == "gathered", missing=True)
    check_against_oracle(args, kw, torch.float32)
    inp = validate(*args, **kw)
    dla, dots, norms = _C.fused_attribution_f32(
        inp.z.numpy(), inp.W_O.numpy(), inp.directions.numpy(), inp.scale.numpy(), inp.writers.numpy(),
        inp.extra_nodes.numpy(), direction_ids=None if inp.direction_ids is None else inp.direction_ids.numpy())
    assert _is_mapped(dots) and not _is_mapped(norms)


def test_mapped_outputs_live_with_their_arrays_and_go_back_to_the_pool():
    import gc

    mapped = _mapped_from()
    T = mapped // (5 * 4 * 4) + 7  # dots [T, 5, 4] float32 just above the size
    args = _good(T=T, N=4, H=3, D=5, K=3, M=1, W=4)
    _C.release_scratch()
    dots = _C.fused_attribution_f32(**args)[1]
    assert _is_mapped(dots) and _C.scratch_info()["kept_blocks"] == 0  # the block is the array's
    t = torch.from_numpy(dots)
    want = dots.copy()
    del dots
    gc.collect()
    assert np.array_equal(t.numpy(), want)  # the tensor keeps the block
    assert _C.scratch_info()["kept_blocks"] == 0
    del t
    gc.collect()
    kept = _C.scratch_info()
    assert kept["kept_blocks"] == 1 and kept["kept_bytes"] >= T * 5 * 4 * 4  # back in the pool

    def address_space() -> int:  # bytes (VmSize: mapped, whether touched or not)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    before = address_space()
    for _ in range(20):
        out = _C.fused_attribution_f32(**args)
        assert _is_mapped(out[1])
        del out
    assert address_space() - before < kept["kept_bytes"]  # every call took the kept block, and gave it back
    assert _C.scratch_info() == kept
    _C.release_scratch()
    assert _C.scratch_info()["kept_bytes"] == 0
    assert before - address_space() >= kept["kept_bytes"]  # unmapped


def test_kernels_in_several_python_threads_share_the_pool():
    # the kernels release the GIL: calls from several threads take and give back pool blocks at once
    # (dots [T, 11, 5] float32: 330 KiB and more, from the pool where the build has one)
    import threading

    cases = [make_case(1501 + 17 * i, 9, 16, 40, 2, 5, 300, incorrect=bool(i % 2), missing=True, seed=i)
             for i in range(4)]
    inputs = [validate(*args, **kw) for args, kw in cases]
    want = [cpp.run(inp) for inp in inputs]
    got, errors = {}, []

    def work(i):
        try:
            for r in range(6):
                got[(i, r)] = cpp.run(inputs[i])
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, r), out in got.items():
        for name in ("dla", "dots", "norms"):
            a, b = getattr(out, name), getattr(want[i], name)
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan()), (i, r, name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_uses_its_own_pool():
    args = _good(T=(1 << 18) // (5 * 4 * 4) + 7, N=4, H=3, D=5, K=3, M=1, W=4)  # dots of 256 KiB and more
    out = _C.fused_attribution_f32(**args)
    kept = _C.scratch_info()
    pid = os.fork()
    if pid == 0:  # the child: the pool's lock and its kept blocks are usable
        code = 1
        try:
            info = _C.scratch_info()
            _C.release_scratch()
            code = 0 if info == kept and _C.scratch_info()["kept_bytes"] == 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert _C.scratch_info() == kept  # the parent's pool is untouched
    del out


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


# ---------------------------------------------------------------------------------------------
# DLA-only fast paths (W = 0, M = 0): head-space directions A = W_O c(d), no d_model output formed
DLA_SHAPES = [  # T, N, H, D, K   (D >= 2 H: the DLA-only path; K >= 8 exercises the GEMM builder)
    (1, 1, 3, 13, 1),
    (7, 5, 3, 120, 4),
    (37, 5, 24, 120, 40),
    (37, 1, 7, 16, 9),
    (50, 3, 64, 130, 3),
    (13, 5, 8, 16, 12),  # d_model and N * d_head multiples of the SIMD block
    (101, 6, 24, 77, 200),
]


def _dla_case(shape, dtype, mode, incorrect, missing, center=True):
    T, N, H, D, K = shape
    seed = zlib.crc32(repr((shape, str(dtype), mode, incorrect, missing, center)).encode())
    return make_case(T, N, H, D, 0, 0, K, dtype=dtype, mode=mode, incorrect=incorrect,
                     missing=missing, center=center, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", DLA_SHAPES, ids=lambda s: "T{}N{}H{}D{}K{}".format(*s))
@pytest.mark.parametrize(
    "mode,incorrect,missing",
    [("fixed", False, False), ("gathered", False, False), ("gathered", True, True),
     ("gathered", False, True)],
)
@pytest.mark.parametrize("center", [True, False])
def test_dla_only_path_matches_oracle(dtype, shape, mode, incorrect, missing, center, cpp_last_path):
    args, kw = _dla_case(shape, dtype, mode, incorrect, missing, center)
    got, _ = check_against_oracle(args, kw, dtype)
    assert cpp_last_path().startswith("dla_fixed" if mode == "fixed" else "dla_unique")
    assert got.dots.shape == (shape[0], shape[1], 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dla_only_path_half_inputs(dtype, cpp_last_path):
    args, kw = _dla_case((37, 5, 24, 120, 40), dtype, "gathered", True, True)
    got, _ = check_against_oracle(args, kw, dtype)
    assert got.dla.dtype == torch.float32 and cpp_last_path().startswith("dla_")


@pytest.mark.parametrize("mode,incorrect", [("gathered", True), ("gathered", False), ("fixed", False)])
@pytest.mark.parametrize("D", [77, 128])
def test_dla_only_bf16_directions_far_from_zero_mean(mode, incorrect, D, cpp_last_path):
    # bf16 head-space directions from products of bf16 values (amx, avx512_bf16) take a direction whose
    # mean is large against its spread centred in fp32 and split in three parts, the others as they are
    # with a rank-one centring: both kinds, in blocks together, against float64
    args, kw = _dla_case((45, 3, 24, D, 12), torch.bfloat16, mode, incorrect, True)
    z, W_O, directions, scale, writers, extra = args
    directions = directions.clone()
    directions[::3] += 10.0  # mean 10.3 against a spread of 1: past the exact-rows bound (3)
    got, _ = check_against_oracle((z, W_O, directions, scale, writers, extra), kw, torch.bfloat16)
    assert cpp_last_path().startswith("dla_fixed" if mode == "fixed" else "dla_unique")
    assert bool(torch.isfinite(got.dla).any())


def test_small_d_model_keeps_fused_kernel(cpp_last_path):
    # d_model < 2 d_head: the Gram-matrix norms would lose accuracy, so the fused kernel runs
    args, kw = make_case(9, 3, 40, 30, 0, 0, 4, dtype=torch.float32)
    check_against_oracle(args, kw, torch.float32)
    assert cpp_last_path() == "fused"
    args, kw = make_case(9, 3, 8, 40, 0, 1, 4, dtype=torch.float32)  # a writer: fused
    check_against_oracle(args, kw, torch.float32)
    assert cpp_last_path() == "fused"


def _fused_np(inp, fn):
    return fn(inp.z.numpy(), inp.W_O.numpy(), inp.directions.numpy(), inp.scale.numpy(),
              inp.writers.numpy(), None,
              direction_ids=None if inp.direction_ids is None else inp.direction_ids.numpy(),
              incorrect_ids=None if inp.incorrect_ids is None else inp.incorrect_ids.numpy(),
              center=inp.center)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(60, 4, 16, 40, 5), (120, 5, 24, 120, 300), (33, 2, 3, 21, 9)],
                         ids=lambda s: "T{}N{}H{}D{}K{}".format(*s))
@pytest.mark.parametrize("incorrect,missing", [(False, False), (True, False), (False, True), (True, True)])
def test_gathered_unique_table_fused_agree(dtype, shape, incorrect, missing, cpp_last_path):
    args, kw = _dla_case(shape, dtype, "gathered", incorrect, missing)
    inp = validate(*args, **kw)
    want = torch_ref.run(as_f64(inp))
    floor = magnitudes(inp, want)["dla"]
    table = build_dla_table(inp.W_O, inp.directions, inp.center)
    assert table.shape == (shape[4], shape[1], shape[2]) and table.table.dtype == dtype
    assert table.nbytes == shape[4] * shape[1] * shape[2] * table.table.element_size()
    res = {}
    for method in ("unique", "table", "auto"):
        dla, norms = cpp.dla_gathered(table, inp.z, inp.scale, inp.direction_ids, inp.incorrect_ids,
                                      method=method, norms=True)
        assert cpp_last_path().startswith("dla_table" if method == "table" else "dla_")
        res[method] = dla
        assert rel_err(norms, want.norms) <= TOL[dtype]
    res["unique, no table"] = cpp.dla_gathered(None, inp.z, inp.scale, inp.direction_ids,
                                               inp.incorrect_ids, W_O=inp.W_O,
                                               directions=inp.directions)
    fn = _C.fused_attribution_f64 if dtype == torch.float64 else _C.fused_attribution_f32
    res["fused"] = torch.from_numpy(_fused_np(inp, fn)[0])
    for name, dla in res.items():
        e = rel_err(dla, want.dla, floor)
        _worst[dtype] = max(_worst.get(dtype, 0.0), e)
        assert e <= TOL[dtype], f"{name}: rel err {e:.3g}"
    torch.testing.assert_close(res["unique"], res["unique, no table"], rtol=0, atol=0, equal_nan=True)
    bad = inp.direction_ids < 0
    if incorrect:
        bad = bad | (inp.incorrect_ids < 0)
    assert torch.equal(torch.isnan(res["table"]).all(1), bad)


def test_table_is_used_only_when_passed_and_invalidated_in_place(cpp_last_path):
    T, N, H, D, K = 400, 3, 8, 64, 300
    args, kw = make_case(T, N, H, D, 0, 0, K, dtype=torch.float32, seed=5)
    z, W_O, dirs, scale, writers, _ = args
    table = build_dla_table(W_O, dirs, center=True)
    n_unique = int(torch.unique(kw["direction_ids"]).numel())
    assert cpp.prefer_table(n_unique, T, D)  # many distinct ids per token: the table wins
    # a table that was built but not passed is never consulted: no hidden state between calls
    fused_attribution(z, W_O, dirs, scale, [], backend="cpp", **kw)
    assert cpp_last_path().startswith("dla_unique")
    got = fused_attribution(z, W_O, dirs, scale, [], backend="cpp", dla_table=table, **kw)
    assert cpp_last_path().startswith("dla_table")
    want = fused_attribution(z, W_O, dirs, scale, [], backend="torch", **kw)
    assert rel_err(got.dla, want.dla) < 1e-5 and rel_err(got.norms, want.norms) < 1e-5
    # other centring, other tensors, a writer, fixed mode: refused before any work
    with pytest.raises(ValueError, match="not built from these W_O / directions"):
        fused_attribution(z, W_O, dirs, scale, [], backend="cpp", dla_table=table, **dict(kw, center=False))
    with pytest.raises(ValueError, match="not built from these W_O / directions"):
        fused_attribution(z, W_O, dirs.clone(), scale, [], backend="cpp", dla_table=table, **kw)
    with pytest.raises(ValueError, match="gathered DLA-only"):
        fused_attribution(z, W_O, dirs, scale, [0], backend="cpp", dla_table=table, **kw)
    with pytest.raises(ValueError, match="gathered DLA-only"):
        fused_attribution(z, W_O, dirs, scale, [], backend="cpp", dla_table=table)
    with pytest.raises(TypeError, match="dla_table must be an erasure_fast.DlaTable"):
        fused_attribution(z, W_O, dirs, scale, [], backend="cpp", dla_table=table.table, **kw)
    # few distinct ids: the auto rule takes the unique reduction even with a complete table
    few = torch.zeros(T, dtype=torch.int64)
    fused_attribution(z, W_O, dirs, scale, [], backend="cpp", direction_ids=few, dla_table=table)
    assert cpp_last_path().startswith("dla_unique")
    # an in-place change of W_O (version counter) retires the table
    W_O.mul_(2.0)
    assert not table.is_current()
    with pytest.raises(ValueError, match="modified in place"):
        fused_attribution(z, W_O, dirs, scale, [], backend="cpp", dla_table=table, **kw)
    with pytest.raises(ValueError, match="not built from these"):
        cpp.dla_gathered(table, z, scale, kw["direction_ids"])


def test_nan_in_a_gathered_row_is_caught_and_unused_rows_are_not_read():
    """Finiteness is checked on the rows a gathered call reads, every call (no cache): a NaN written
    into a row after an earlier clean call is still caught, a NaN in a row nobody reads is harmless."""
    T, N, H, D, K = 50, 2, 8, 32, 40
    args, kw = make_case(T, N, H, D, 0, 0, K, dtype=torch.float32, seed=9)
    z, W_O, dirs, scale, _, _ = args
    ids = kw["direction_ids"].clone()
    ids[ids == 7] = 8
    fused_attribution(z, W_O, dirs, scale, [], backend="cpp", direction_ids=ids)
    dirs.numpy()[7, 3] = float("nan")  # not read by any token: fine, and no version bump needed
    fused_attribution(z, W_O, dirs, scale, [], backend="cpp", direction_ids=ids)
    row = int(ids[ids >= 0][0])
    dirs.numpy()[row, 0] = float("nan")  # a numpy write bumps no version counter
    with pytest.raises(ValueError, match=rf"directions contains non-finite values \(first at index \[{row}, 0\]\)"):
        fused_attribution(z, W_O, dirs, scale, [], backend="cpp", direction_ids=ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("incorrect", [False, True])
def test_lazy_table_builds_rows_on_demand(dtype, incorrect, cpp_last_path):
    T, N, H, D, K = 90, 3, 8, 40, 500
    args, kw = make_case(T, N, H, D, 0, 0, K, dtype=dtype, incorrect=incorrect, missing=True, seed=11)
    z, W_O, dirs, scale, _, _ = args
    full = build_dla_table(W_O, dirs, center=True)
    lazy = build_dla_table(W_O, dirs, center=True, lazy=True)
    assert lazy.lazy and lazy.n_filled == 0 and lazy.filled_nbytes == 0
    assert lazy.nbytes == full.nbytes and lazy.table.dtype == full.table.dtype
    got = fused_attribution(z, W_O, dirs, scale, [], backend="cpp", dla_table=lazy, **kw)
    assert cpp_last_path().startswith("dla_table")
    ids = [kw["direction_ids"]] + ([kw["incorrect_ids"]] if incorrect else [])
    need = torch.unique(torch.cat(ids))
    need = need[need >= 0]
    assert lazy.n_filled == need.numel() < K  # exactly the rows this call needed
    filled = lazy.filled_rows
    assert torch.equal(filled.nonzero().flatten(), need)
    # a lazy row has the complete table's bits, whatever it was built with
    assert torch.equal(lazy.table[filled], full.table[filled])
    assert lazy.ensure_rows(*ids) == 0  # nothing left to build for the same ids
    again = fused_attribution(z, W_O, dirs, scale, [], backend="cpp", dla_table=lazy, **kw)
    assert torch.equal(got.dla.nan_to_num(7.0), again.dla.nan_to_num(7.0))
    want = torch_ref.run(as_f64(validate(z, W_O, dirs, scale, [], **kw)))
    floor = magnitudes(validate(z, W_O, dirs, scale, [], **kw), want)["dla"]
    assert rel_err(got.dla, want.dla, floor) < TOL[dtype]
    # new ids build only their own rows; -1 builds nothing
    more = torch.full((T,), -1, dtype=torch.int64)
    more[:3] = torch.tensor([K - 1, K - 2, int(need[0])])
    fresh = {K - 1, K - 2} - set(need.tolist())
    assert lazy.ensure_rows(more) == len(fresh)
    with pytest.raises(ValueError, match="ids must lie in"):
        lazy.ensure_rows(torch.tensor([K]))


def test_fill_rows_binding_writes_in_place_or_refuses():
    W_O = np.random.default_rng(0).standard_normal((2, 3, 10)).astype(np.float32)
    dirs = np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32)
    full = _C.build_dla_table_f32(W_O, dirs)
    table = np.full((6, 2, 3), np.nan, np.float32)
    _C.fill_dla_table_rows_f32(W_O, dirs, np.array([4, 1, 4], np.int64), table)
    assert np.array_equal(table[[1, 4]], full[[1, 4]]) and np.isnan(table[[0, 2, 3, 5]]).all()
    for bad, match in [
        (np.zeros((6, 2, 3), np.float64), "table must have dtype float32"),
        (np.zeros((6, 3, 2), np.float32).transpose(0, 2, 1), "C-contiguous"),
        (np.zeros((5, 2, 3), np.float32), "table must have shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            _C.fill_dla_table_rows_f32(W_O, dirs, np.array([0], np.int64), bad)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 6\)"):
        _C.fill_dla_table_rows_f32(W_O, dirs, np.array([6], np.int64), table)
    ro = np.zeros((6, 2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _C.fill_dla_table_rows_f32(W_O, dirs, np.array([0], np.int64), ro)


def test_auto_rule_is_monotone():
    assert not cpp.prefer_table(1, 8192, 512)
    assert cpp.prefer_table(8192, 8192, 512)
    assert not cpp.prefer_table(100, 8192, 512) and cpp.prefer_table(1000, 8192, 512)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["fixed", "unique_small", "unique", "table"])
def test_dla_only_thread_count_independent_bitwise(dtype, path):
    K = 3 if path == "unique_small" else 60
    args, kw = make_case(101, 6, 24, 77, 0, 0, K, dtype=dtype,
                         mode="fixed" if path == "fixed" else "gathered", incorrect=True, missing=True)
    inp = validate(*args, **kw)
    table = build_dla_table(inp.W_O, inp.directions) if path == "table" else None
    outs = []
    try:
        for n in (1, 2, 3):
            cpp.set_num_threads(n)
            if path == "fixed":
                outs.append(cpp.run(inp))
            else:
                outs.append(cpp.dla_gathered(table, inp.z, inp.scale, inp.direction_ids,
                                             inp.incorrect_ids, W_O=inp.W_O,
                                             directions=inp.directions,
                                             method="table" if table else "unique", norms=True))
            if path == "table":
                outs[-1] += (build_dla_table(inp.W_O, inp.directions).table,)
    finally:
        cpp.set_num_threads(None)
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert x.numpy().tobytes() == y.numpy().tobytes()


def test_dla_fixed_helper_logit_difference():
    args, kw = make_case(20, 4, 16, 64, 0, 0, 10, dtype=torch.float64, mode="fixed")
    z, W_O, dirs, scale = args[:4]
    d = (dirs[3] - dirs[7])[None]
    dla = cpp.dla_fixed(z, W_O, d, scale)
    want = torch_ref.run(validate(z, W_O, d, scale, []))
    assert dla.shape == (20, 4, 1) and rel_err(dla, want.dla) < 1e-12


# binding-level checks of the DLA-only entry points
def _good_dla(T=4, N=3, H=5, D=11, K=4):
    a = _good(T=T, N=N, H=H, D=D, K=K)
    del a["writers"], a["extra_nodes"]
    return a


def test_dla_bindings_accept_good_arguments():
    a = _good_dla()
    tab = _C.build_dla_table_f32(a["W_O"], a["directions"])
    assert tab.shape == (4, 3, 5)
    dla, norms, info = _C.dla_gathered_f32(**a, table=tab, method="table")
    assert dla.shape == (4, 3) and norms.shape == (4, 3) and info["method"] == "table"
    assert info["n_unique"] == 1
    del a["direction_ids"]
    dla, norms, info = _C.dla_fixed_f32(**a, norms=False)
    assert dla.shape == (4, 3, 4) and norms is None


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=np.zeros((4, 3), np.float32)), "z must have shape"),
        (dict(W_O=np.zeros((3, 6, 11), np.float32)), "W_O must have shape"),
        (dict(directions=np.zeros((4, 8), np.float32)), "directions must have shape"),
        (dict(directions=np.zeros((0, 11), np.float32)), "K = 0"),
        (dict(scale=np.ones(5, np.float32)), "scale must have shape"),
        (dict(scale=np.array([1, 1, np.nan, 1], np.float32)), "scale must be finite and > 0"),
        (dict(direction_ids=np.zeros(3, np.int64)), "direction_ids must have shape"),
        (dict(direction_ids=np.array([0, 1, 4, 0], np.int64)), r"direction_ids must lie in \[-1, 4\)"),
        (dict(incorrect_ids=np.array([0, -2, 0, 0], np.int64)), "incorrect_ids must lie in"),
        (dict(incorrect_ids=np.zeros(5, np.int64)), "incorrect_ids must have shape"),
        (dict(method="table"), "needs a table"),
        (dict(method="fast"), "method must be"),
        (dict(table=np.zeros((4, 3, 6), np.float32)), "table must have shape"),
        (dict(table=np.zeros((5, 3, 5), np.float32)), "table must have shape"),
    ],
)
def test_dla_gathered_binding_rejects_bad_arguments(change, match):
    a = _good_dla()
    a.update(change)
    with pytest.raises(ValueError, match=match):
        _C.dla_gathered_f32(**a)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=np.zeros((4, 3, 5, 1), np.float32)), "z must have shape"),
        (dict(W_O=np.zeros((2, 5, 11), np.float32)), "W_O must have shape"),
        (dict(directions=np.zeros((4, 12), np.float32)), "directions must have shape"),
        (dict(scale=np.zeros(4, np.float32)), "scale must be finite and > 0"),
    ],
)
def test_dla_fixed_binding_rejects_bad_arguments(change, match):
    a = _good_dla()
    del a["direction_ids"]
    a.update(change)
    with pytest.raises(ValueError, match=match):
        _C.dla_fixed_f32(**a)


@pytest.mark.parametrize(
    "W_O,directions,match",
    [
        (np.zeros((3, 5), np.float32), np.zeros((4, 11), np.float32), "W_O must have shape"),
        (np.zeros((3, 5, 0), np.float32), np.zeros((4, 0), np.float32), "d_model >= 1"),
        (np.zeros((3, 5, 11), np.float32), np.zeros((4, 10), np.float32), "directions must have shape"),
        (np.zeros((3, 5, 11), np.float32), np.zeros((0, 11), np.float32), "K = 0"),
    ],
)
def test_build_table_binding_rejects_bad_arguments(W_O, directions, match):
    with pytest.raises(ValueError, match=match):
        _C.build_dla_table_f32(W_O, directions)


def test_dla_bindings_reject_wrong_dtype():
    a = _good_dla()
    a["z"] = a["z"].astype(np.float64)
    with pytest.raises(TypeError):
        _C.dla_gathered_f32(**a)
    with pytest.raises(TypeError):
        _C.build_dla_table_f32(a["W_O"].astype(np.float64), a["directions"])
