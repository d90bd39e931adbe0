"""Run-time dispatch of the C++ kernels (csrc/dispatch.h): the paths compiled in and the one selected,
refusals, the environment variable, every path against the others on odd shapes (K1, the DLA-only
paths, the scan aggregation), and the built module's instructions staying inside their path.

The float64 oracle and TransformerLens comparisons run on every path through the other modules
(conftest.each_cpu_path, conftest.with_cpu_paths)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from erasure_fast.backends import cpp, torch_ref
from erasure_fast.backends.dla_table import build_dla_table
from erasure_fast.contract import fused_attribution, validate

_ok, _why = cpp.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"cpp backend unavailable: {_why}")

from conftest import TOL_AMX_BF16, cpu_paths_here  # noqa: E402
from test_backend_cpp import as_f64, magnitudes, make_case, rel_err  # noqa: E402

ALL = ["portable", "avx2", "avx512", "avx512_bf16", "amx"]
PATHS = cpu_paths_here()
# Across paths, relative to the outputs' scale (Cauchy-Schwarz magnitude): fp32 rounding of sums of
# up to d_model terms in different orders; the amx path's bf16 kernel leaves out lo x lo (amx_kernels.cpp).
CROSS = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-6, torch.float16: 1e-6}


@pytest.fixture(autouse=True)
def _default_path_after():
    yield
    cpp.set_cpu_path(None)


def test_paths_listed_in_order_and_fastest_selected(monkeypatch):
    monkeypatch.delenv(cpp.ENV_CPU_PATH, raising=False)
    paths = cpp.cpu_paths()
    assert list(paths) == ALL
    assert paths["portable"]["compiled"] and paths["portable"]["runs_here"]
    for name, p in paths.items():
        assert p["runs_here"] == (p["compiled"] and not p["missing"]), name
    info = cpp.build_info()
    assert info["cpu_path"] == info["best_cpu_path"] == PATHS[-1]
    assert info["cpu_paths"] == [n for n in ALL if paths[n]["compiled"]]
    assert info["simd"] == paths[PATHS[-1]]["simd"]
    ok, detail = cpp.available()
    assert ok and f"kernel path {PATHS[-1]}" in detail


@pytest.mark.parametrize("path", PATHS)
def test_set_cpu_path_selects_it(path):
    assert cpp.set_cpu_path(path) == path
    assert cpp.get_cpu_path() == path and cpp.build_info()["cpu_path"] == path
    args, kw = make_case(9, 3, 5, 7, 1, 2, 4)
    cpp.run(validate(*args, **kw))
    assert cpp.build_info()["cpu_path"] == path
    assert cpp.set_cpu_path(None) == cpp.build_info()["best_cpu_path"]


def test_unknown_path_refused():
    with pytest.raises(ValueError, match="unknown CPU path 'sse9'.*portable"):
        cpp.set_cpu_path("sse9")
    with pytest.raises(ValueError):
        cpp.set_cpu_path(3)


@pytest.mark.parametrize("path", [p for p in ALL if p not in PATHS])
def test_path_this_cpu_cannot_run_is_refused(path):
    why = cpp.cpu_paths()[path]
    pattern = "lacks " + re.escape(why["missing"][0]) if why["compiled"] else "not compiled into this build"
    with pytest.raises(ValueError, match=pattern):
        cpp.set_cpu_path(path)
    assert cpp.build_info()["cpu_path"] == cpp.build_info()["best_cpu_path"]  # unchanged


def test_environment_variable_selects_and_refuses(monkeypatch):
    monkeypatch.setenv(cpp.ENV_CPU_PATH, "portable")
    assert cpp.get_cpu_path() == "portable"
    assert cpp.build_info()["cpu_path"] == "portable"
    cpp.set_cpu_path(PATHS[-1])  # the setter wins over the environment
    assert cpp.build_info()["cpu_path"] == PATHS[-1]
    cpp.set_cpu_path(None)
    assert cpp.build_info()["cpu_path"] == "portable"
    monkeypatch.setenv(cpp.ENV_CPU_PATH, "sse9")
    ok, detail = cpp.available()
    assert not ok and cpp.ENV_CPU_PATH in detail and "sse9" in detail
    args, kw = make_case(4, 2, 3, 5, 0, 1, 2)
    with pytest.raises(ValueError, match="unknown CPU path"):
        cpp.run(validate(*args, **kw))


def test_environment_variable_in_a_fresh_process():
    code = ("from erasure_fast.backends import cpp; from erasure_fast import _C; "
            "print(cpp.build_info()['cpu_path'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, **{cpp.ENV_CPU_PATH: "portable"}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"


def _on_every_path(fn):
    """{path: fn()} with each path selected in turn."""
    out = {}
    for p in PATHS:
        cpp.set_cpu_path(p)
        out[p] = fn()
    cpp.set_cpu_path(None)
    return out


def _agree_with_portable(outs: dict, tol: float) -> None:
    """Every path's outputs (tuples of tensors) have portable's NaN pattern and lie within ``tol`` of
    its largest finite value."""
    for path, got in outs.items():
        for a, b in zip(got, outs["portable"]):
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)), path
            scale_ = float(b[fin].abs().max())
            assert float((a[fin] - b[fin]).abs().max()) <= tol * scale_, path


def _cross_tol(dtype, path) -> float:
    return TOL_AMX_BF16 if dtype == torch.bfloat16 and path == "amx" else CROSS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,mode,incorrect", [
    ((37, 5, 24, 77, 2, 3, 5), "gathered", True),
    ((33, 7, 64, 130, 3, 7, 4), "gathered", False),  # every head a writer, a partial lane tile
    ((70, 4, 17, 40, 1, 2, 3), "fixed", False),
    ((1, 1, 3, 13, 0, 1, 1), "gathered", False),
], ids=["mixed", "all-writers", "fixed", "one-token"])
def test_fused_kernel_agrees_across_paths(dtype, shape, mode, incorrect):
    args, kw = make_case(*shape, dtype=dtype, mode=mode, incorrect=incorrect, missing=True)
    inp = validate(*args, **kw)
    floor = magnitudes(inp, torch_ref.run(as_f64(inp)))
    outs = _on_every_path(lambda: cpp.run(inp))
    base = outs["portable"]
    for path, got in outs.items():
        for name in ("dla", "dots", "norms"):
            e = rel_err(getattr(got, name), getattr(base, name), floor[name])
            assert e <= _cross_tol(dtype, path), f"{path} {name}: {e:.3g} from portable"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("in_order", [True, False], ids=["writers-in-order", "writers-permuted"])
def test_fused_kernel_with_many_nodes_and_writers(dtype, in_order):
    """100 heads, all writers, and 5 extra nodes: 106 Gram rows per token on the amx path (7 row blocks,
    a token's dots staged and streamed out whole), 105 x 100 dots per token. Every path against the
    float64 oracle and against the others."""
    T, N, M = 35, 100, 5
    args, kw = make_case(T, N, 8, 24, M, N, 3, dtype=dtype, incorrect=True, missing=True)
    writers = torch.arange(N) if in_order else torch.randperm(N, generator=torch.Generator().manual_seed(1))
    args = args[:4] + (writers,) + args[5:]
    inp = validate(*args, **kw)
    want = torch_ref.run(as_f64(inp))
    floor = magnitudes(inp, want)
    outs = _on_every_path(lambda: cpp.run(inp))
    oracle_tol = 1e-12 if dtype == torch.float64 else 1e-5
    for path, got in outs.items():
        for name in ("dla", "dots", "norms"):
            e = rel_err(getattr(got, name), getattr(want, name), floor[name])
            assert e <= oracle_tol, f"{path} {name}: {e:.3g} from the float64 oracle"
            e = rel_err(getattr(got, name), getattr(outs["portable"], name), floor[name])
            assert e <= _cross_tol(dtype, path), f"{path} {name}: {e:.3g} from portable"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(50, 6, 16, 48, 30), (97, 5, 13, 37, 120), (61, 21, 32, 40, 50)],
                         ids=["small", "odd-blocks", "head-groups"])
def test_dla_only_paths_agree_across_paths(dtype, shape):
    """fixed, gathered and table DLA on every path; "odd-blocks": N * d_head = 65 and d_model = 37 fill
    no tile of the amx path's head-space GEMM, and more than 32 distinct targets take several;
    "head-groups": 21 heads of d_head 32, reduced in groups of a vector's width (16 + 5 on avx512,
    8 + 8 + 5 on avx2)."""
    T, N, H, D, K = shape
    args, kw = make_case(T, N, H, D, 0, 0, K, dtype=dtype, incorrect=True, missing=True)
    z, W_O, directions, scale = args[:4]
    ids, inc = kw["direction_ids"], kw["incorrect_ids"]
    table = build_dla_table(W_O, directions, center=True, lazy=False)

    def run():
        return (cpp.dla_fixed(z, W_O, directions[:3], scale, norms=True)
                + cpp.dla_gathered(None, z, scale, ids, inc, W_O=W_O, directions=directions, norms=True)
                + (cpp.dla_gathered(table, z, scale, ids, method="table"),))

    _agree_with_portable(_on_every_path(run), CROSS[dtype])


@pytest.mark.parametrize("incorrect", [False, True])
@pytest.mark.parametrize("center", [True, False])
def test_dla_only_paths_agree_for_bf16_directions_dominated_by_their_mean(incorrect, center):
    """bf16 directions whose mean is many times their spread (the amx path centres those in fp32
    instead of correcting the uncentred product, csrc/dla_only.cpp), every fourth one, so blocks of 32
    mix both kinds: every path agrees with portable to the cross-path bar, and a row's bits do not
    depend on which rows it is built with (a lazy table's rows equal the complete table's). (fp32
    inputs are not held to the bar here: centring an fp32 row of mean 40 rounds at 40 x 2^-24 on
    every path.)"""
    dtype = torch.bfloat16
    T, N, H, D, K = 83, 5, 16, 70, 150
    args, kw = make_case(T, N, H, D, 0, 0, K, dtype=dtype, incorrect=incorrect, missing=True, center=center,
                         seed=5)
    z, W_O, directions, scale = args[:4]
    offset = torch.zeros(K, 1, dtype=torch.float64)
    offset[::4] = 40.0
    directions = (directions.to(torch.float64) + offset).to(dtype)
    ids, inc = kw["direction_ids"], kw.get("incorrect_ids")

    def run():
        full = build_dla_table(W_O, directions, center=center, lazy=False)
        lazy = build_dla_table(W_O, directions, center=center, lazy=True)
        lazy.ensure_rows(torch.arange(K - 1, -1, -7))  # other groupings of the same rows
        rows = lazy.filled_rows
        assert torch.equal(lazy.table[rows], full.table[rows])
        return (cpp.dla_gathered(None, z, scale, ids, inc, W_O=W_O, directions=directions, center=center),
                cpp.dla_fixed(z, W_O, directions[:6], scale, center=center))

    _agree_with_portable(_on_every_path(run), CROSS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(301, 5, 13, 37, 60), (257, 6, 16, 48, 9), (64, 3, 24, 40, 200),
                                   (700, 3, 16, 40, 5000)],
                         ids=["odd-head", "many-tokens-per-target", "many-targets", "many-work-items"])
def test_gathered_dla_same_bits_with_or_without_norms_and_any_thread_count(dtype, shape):
    """The gathered DLA with 8 or more distinct targets (head-space directions from the path's builder
    past the dot path: the GEMM, the VDPBF16PS pairs or the tile unit), on every path: the same bits
    with and without norms and for 1 to 3 threads (with ~600 distinct targets, the builders' work
    items split differently for each), NaN exactly where a token has no target, and a NaN in z at a
    token without a target refused by the public call without norms too."""
    T, N, H, D, K = shape
    args, kw = make_case(T, N, H, D, 0, 0, K, dtype=dtype, incorrect=dtype == torch.float64, missing=True, seed=11)
    z, W_O, directions, scale = args[:4]
    ids, inc = kw["direction_ids"], kw.get("incorrect_ids")
    no_target = ids < 0 if inc is None else (ids < 0) | (inc < 0)
    assert bool(no_target.any()) and int(torch.unique(ids[ids >= 0]).numel()) >= 8  # past the dot path
    bad = z.clone()
    bad[int(no_target.nonzero()[0, 0]), N - 1, H - 1] = float("nan")
    try:
        for path in PATHS:
            cpp.set_cpu_path(path)
            cpp.set_num_threads(1)
            want, _ = cpp.dla_gathered(None, z, scale, ids, inc, W_O=W_O, directions=directions, norms=True)
            assert torch.equal(torch.isnan(want).all(1), no_target) and bool(torch.isfinite(want[~no_target]).all())
            for n in (1, 2, 3):
                cpp.set_num_threads(n)
                got = cpp.dla_gathered(None, z, scale, ids, inc, W_O=W_O, directions=directions)
                assert _same_bits(got, want), (path, n)
            with pytest.raises(ValueError, match="z"):
                fused_attribution(bad, W_O, directions, scale, [], backend="cpp", with_norms=False, **kw)
    finally:
        cpp.set_num_threads(None)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                      b.view(-1).view(torch.uint8))


@pytest.mark.skipif(not _ok or cpp.scratch_info()["min_bytes"] is None,
                    reason="this build keeps no scratch (AddressSanitizer)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_results_do_not_depend_on_what_kept_scratch_holds(dtype):
    """Large scratch and outputs are blocks of a pool kept between calls (csrc/scratch_pool.h): every
    kernel on every path, run once on fresh (zero-filled) blocks, then again after every kept block was
    overwritten with 0xFF bytes (NaN in every float type), gives the same bits. Shapes large enough
    that the outputs, the head-space directions and the table come from the pool."""
    T, N, H, D, M, W, K = 601, 20, 16, 70, 3, 20, 400
    args, kw = make_case(T, N, H, D, M, W, K, dtype=dtype, incorrect=True, missing=True)
    z, W_O, directions, scale = args[:4]
    ids, inc = kw["direction_ids"], kw["incorrect_ids"]
    inp = validate(*args, **kw)

    def run():
        table = build_dla_table(W_O, directions, center=True, lazy=False)
        lazy = build_dla_table(W_O, directions, center=True, lazy=True)
        lazy.ensure_rows(torch.arange(K - 1, -1, -3))
        full = cpp.run(inp)
        outs = (full.dla, full.dots, full.norms, table.table, lazy.table[lazy.filled_rows],
                *cpp.dla_gathered(None, z, scale, ids, inc, W_O=W_O, directions=directions, norms=True),
                cpp.dla_gathered(table, z, scale, ids, method="table"),
                *cpp.dla_fixed(z, W_O, directions[:3], scale, norms=True))
        return tuple(o.clone() for o in outs)  # copies: the kernels' own blocks go back to the pool

    for path in PATHS:
        cpp.set_cpu_path(path)
        cpp.release_scratch()
        first = run()
        kept = cpp.scratch_info()
        assert kept["kept_bytes"] >= K * N * H * 4 and kept["kept_blocks"] >= 2, (path, kept)  # the pool was used
        cpp.require_extension()._fill_kept_scratch(0xFF)
        second = run()
        for i, (a, b) in enumerate(zip(first, second)):
            assert _same_bits(a, b), f"{path}: output {i} changed with what the kept scratch held"
    cpp.release_scratch()
    assert cpp.scratch_info()["kept_bytes"] == 0


def test_scan_aggregation_identical_across_paths():
    g = torch.Generator().manual_seed(3)
    T, R, W, P = 211, 5, 4, 9
    dots = torch.randn(T, R, W, generator=g)
    dots[::17] = float("nan")
    norms = torch.rand(T, R, generator=g) + 0.1
    null = torch.randn(T, P, generator=g)
    writers = torch.tensor([0, 2, 3, 4])
    pairs = torch.randperm(R * W, generator=g)[:P]
    bucket = torch.randint(0, 3, (T,), generator=g)

    def run():
        from erasure_fast import _C

        hist = np.zeros((3, R * W, 52), np.int64)
        series = _C.series_stats_batch_f32(dots.reshape(T, -1).numpy(), bucket.numpy(), 3, -2.0, 12.5, 50, hist)
        rhist = np.zeros((3, R * W, 52), np.int64)
        ratio = _C.ratio_stats_batch_f32([dots.numpy()], norms[:, :W].contiguous().numpy(), bucket.numpy(), 3,
                                         -2.0, 12.5, 50, rhist)
        phists = [np.zeros((3 if k < 4 else 1, P, 42), np.int64) for k in range(9)]  # 4 by position, as a scan's
        pair = _C.pair_stats_batch_f32(dots.numpy(), norms.numpy(), null.numpy(), torch.rand(T, dtype=torch.float64).numpy(),
                                       writers.numpy(), pairs.numpy(), np.full(9, -3.0), np.full(9, 7.0),
                                       np.full(9, 40, np.int64), phists, bucket.numpy(), 3)
        return [hist, *series, rhist, *ratio, *phists, *pair]

    torch.manual_seed(0)
    outs = {}
    for p in PATHS:
        torch.manual_seed(0)  # the resid norms drawn inside run()
        cpp.set_cpu_path(p)
        outs[p] = run()
    for path, got in outs.items():
        for a, b in zip(got, outs["portable"]):
            np.testing.assert_array_equal(a, b, err_msg=path)


def test_null_dots_agree_across_paths():
    """The null dots' sums run in one order on every path, with or without fused multiply-adds: within
    1e-6 of the largest, on partial tiles and more columns than a vector holds."""
    g = torch.Generator().manual_seed(5)
    T = 203
    wide = torch.randn(T, 3, 70, generator=g)
    xs = [wide[:, 0, :9].numpy(), wide[:, 1, 3:70].numpy(), wide[:, 2, :1].numpy()]
    dirs = [torch.randn(x.shape[1], c, generator=g).numpy() for x, c in zip(xs, (19, 8, 3))]
    offsets = np.array([0, 19, 27], np.int64)
    outs = {}
    for p in PATHS:
        cpp.set_cpu_path(p)
        outs[p] = cpp.require_extension().null_dots_f32(xs, dirs, offsets, 30)
    for path, got in outs.items():
        ref = outs["portable"]
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), path


def _path_of(symbol: str) -> str:
    for p in ("avx2", "avx512", "avx512_bf16", "amx"):
        if f"ef::{p}::" in symbol:
            return p
    return "portable"


# Registers and instructions that only the path's instruction sets have (ymm: AVX; zmm, opmask:
# AVX-512; bf16 conversions and dot products: AVX512-BF16; tmm: AMX).
_BF16 = r"|vdpbf16ps|vcvtne2?ps2bf16"
FORBIDDEN = {"portable": re.compile(r"%[yzt]mm|%k[0-7]\b|vfmadd" + _BF16),
             "avx2": re.compile(r"%[zt]mm|%k[0-7]\b" + _BF16), "avx512": re.compile(r"%tmm" + _BF16),
             "avx512_bf16": re.compile(r"%tmm")}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_every_function_stays_in_its_path():
    # Each kernel source is compiled once per path into the namespace ef::<path>. A function outside
    # those namespaces (bindings, dispatch, and any library template the linker keeps one copy of)
    # must run on every CPU: its instructions must be the baseline's.
    from erasure_fast import _C

    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    fn, bad, seen, pairs, calls = None, {}, 0, set(), set()
    for line in out.stdout.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn, seen = m.group(1), seen + 1
            continue
        if fn is not None and "vdpbf16ps" in line:
            pairs.add(fn)
        call = re.search(r"\s(?:call|jmp)q?\s+[0-9a-f]+ <(.*)>$", line)
        if fn is not None and call:
            target = re.sub(r"\+0x[0-9a-f]+$", "", call.group(1))
            if target != fn:
                calls.add((fn, target))
        if fn is not None and fn not in bad:
            rule = FORBIDDEN.get(_path_of(fn))
            if rule is not None and rule.search(line):
                bad[fn] = line.strip()
    assert seen > 100, "no symbol table: the module was stripped"
    assert not bad, "functions with instructions beyond their path:\n" + "\n".join(f"{k}: {v}" for k, v in bad.items())
    # Code may call into a path above its own only through the gate that first checks the CPU runs it
    # (csrc/dispatch.cpp): a path's table, even its initialisation, executes the path's instructions.
    rank = {p: i for i, p in enumerate(ALL)}
    gate = {"ef::runnable_table(ef::CpuPath)", "ef::kernels()"}
    upward = sorted({(f, t) for f, t in calls if rank[_path_of(t)] > rank[_path_of(f)] and f not in gate})
    assert not upward, "calls into a path above the caller's, outside the gate:\n" + "\n".join(map(str, upward))
    compiled = [p for p, v in cpp.cpu_paths().items() if v["compiled"]]
    assert {_path_of(t) for f, t in calls if f in gate} >= set(compiled) - {"portable"}, "the gate was not found"
    if cpp.cpu_paths()["avx512_bf16"]["compiled"]:
        # its bf16 kernels multiply pairs: K1's projection and the DLA-only head-space directions
        for kernel in ("ef::avx512_bf16::fused_attribution_lanes<ef::Bf16>",
                       "ef::avx512_bf16::(anonymous namespace)::build_head_dirs_pairs"):
            assert any(kernel in f for f in pairs), (kernel, sorted(pairs))


def test_stub_matches_the_module():
    # erasure_fast/_C.pyi: every entry of the module, with the binding's parameter names
    import ast
    import inspect

    from erasure_fast import _C

    stub_path = os.path.join(os.path.dirname(inspect.getfile(cpp)), "..", "_C.pyi")
    body = ast.parse(open(stub_path).read()).body
    stub = {n.name: [a.arg for a in n.args.args] for n in body if isinstance(n, ast.FunctionDef)}
    classes = {n.name for n in body if isinstance(n, ast.ClassDef)}
    names = {n for n in dir(_C) if not n.startswith("_")}
    assert set(stub) | classes == names
    for name in classes:  # the exceptions: ValueErrors, as the stub says
        assert issubclass(getattr(_C, name), ValueError), name
    for name in set(stub):
        sig = getattr(_C, name).__doc__.splitlines()[0]
        params = re.findall(r"[(,]\s*(\w+):", sig)
        assert params == stub[name], (name, params, stub[name])


BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def _benchmark(name: str):
    """The module benchmarks/<name>.py (a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def test_kernel_paths_benchmark_runs(tmp_path):
    # benchmarks/kernel_paths.py on a few tokens: a row per path and dtype plus the BLAS-tiles rows
    module = _benchmark("kernel_paths")
    threads = torch.get_num_threads()
    try:
        assert module.main(["--tokens", "64", "--repeats", "1", "--out", str(tmp_path / "t.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| float32 |")
            or line.startswith("| bfloat16 |")]
    assert len(rows) == 2 * (len(PATHS) + 2)
    assert cpp.build_info()["cpu_path"] == cpp.build_info()["best_cpu_path"]


def test_ab_builds_benchmark_runs(tmp_path):
    # benchmarks/ab_builds.py against a copy of this very build: a row per workload, dtype and cache state
    from erasure_fast import _C

    other = tmp_path / "other" / "erasure_fast"
    other.mkdir(parents=True)
    shutil.copy(_C.__file__, other / os.path.basename(_C.__file__))
    module = _benchmark("ab_builds")
    module.main(["--other", str(tmp_path / "other"), "--other-label", "copy", "--tokens", "70", "--rounds", "2",
                 "--flush-mib", "8", "--out", str(tmp_path / "ab.md")])
    rows = [line.split("|") for line in (tmp_path / "ab.md").read_text().splitlines()
            if line.startswith("| K")]
    assert [(r[1].strip(), r[2].strip(), r[3].strip()) for r in rows] == [
        (w, d, c) for w in ("K1", "K2n", "K2f") for d in ("float32", "bfloat16") for c in ("warm", "cold", "trimmed")]
    assert all(float(r[6]) > 0 for r in rows)
    # --checks: the kernels' own finiteness checks on, as the public call has them
    module.main(["--other", str(tmp_path / "other"), "--other-label", "copy", "--tokens", "70", "--rounds", "2",
                 "--flush-mib", "8", "--workloads", "K2f", "--dtypes", "float32", "--checks",
                 "--out", str(tmp_path / "ab_checks.md")])
    text = (tmp_path / "ab_checks.md").read_text()
    assert "--checks" in text and sum(line.startswith("| K2f | float32 |") for line in text.splitlines()) == 3
    with pytest.raises(SystemExit, match="unknown"):
        module.main(["--other", str(tmp_path / "other"), "--workloads", "K3"])
    with pytest.raises(SystemExit, match="expected one"):
        module.main(["--other", str(tmp_path)])


def test_cpu_check_plans_its_runs_and_summarizes_committed_ones(tmp_path, capsys):
    # benchmarks/cpu_check.py: the runs it makes on this CPU (a dry run), its refusal of an existing
    # folder, and its summary of the committed Zen 4 runs against the targets
    module = _benchmark("cpu_check")
    runs = lambda paths: [name for name, _, _ in module.runs_to_make(8192, paths)]  # noqa: E731
    yes, no = {"runs_here": True}, {"runs_here": False}
    assert runs({"avx2": yes, "avx512": yes}) == ["fp32-auto", "bf16-auto", "fp32-avx2-mkl-avx2"]
    assert runs({"avx2": yes, "avx512": no}) == runs({"avx2": no, "avx512": no}) == ["fp32-auto", "bf16-auto"]
    out = tmp_path / "new"
    assert module.main(["--dry-run", "--out", str(out)]) == 0 and not out.exists()
    printed = capsys.readouterr().out
    assert "cli backends" in printed and "kernel_paths.py" in printed
    assert printed.count(" bench ") == len(runs(cpp.cpu_paths()))
    with pytest.raises(SystemExit):
        module.main(["--out", str(tmp_path)])
    assert "exists" in capsys.readouterr().err
    text = module.summarize(os.path.join(BENCHMARKS, "results", "cpu-paths-amd-zen4"))
    assert "| `fp32-auto-0a24a66` | avx512_bf16 | fp32 | 127.5 ms, 88.3 %, 15.5x | 16.9 ms, 70.5x |" in text
    assert "| `fp32-auto-0a24a66` | fp32 K1 >= 80% of the fp32 matmul (avx512_bf16) | 88.3 % | yes |" in text
    assert "| `fp32-auto-0a24a66` | fp32 K2n >= 100x TransformerLens | 70.5x | **no** |" in text
    assert "| `fp32-avx2-mkl-avx2-2ad2fb9` | fp32 K1 >= 90% of the fp32 matmul (avx2) | 79.9 % | **no** |" in text
