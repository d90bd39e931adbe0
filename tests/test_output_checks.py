"""The C++ kernels' own finiteness check of their outputs (csrc/kernel_common.h, check_outputs): with
check_outputs=True every fused and DLA-only kernel, on every path this CPU runs and in every dtype,
checks the values it writes and raises `_C.NonFiniteOutput` naming the first of dla, dots, norms
that holds a NaN or an infinity -- never for the DLA of a token without a target, NaN by the
contract; where every output is finite the outputs are bitwise those of the call without the check.
The public calls then raise the contract's error, word for word what the torch backend raises after
its run."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import erasure_fast as ef
from erasure_fast.backends import cpp

_ok, _why = cpp.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"cpp backend unavailable: {_why}")

from conftest import bitwise_equal, cpu_paths_here, small_public_case  # noqa: E402

PATHS = cpu_paths_here()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# as tests/test_activation_checks.py: fused K1-like, fused fixed set, DLA-only fixed (with norms),
# DLA-only gathered by unique reduction and from a table
ENTRIES = ["fused gathered", "fused fixed", "dla fixed", "dla gathered", "dla table"]


@pytest.fixture(autouse=True)
def _default_path_after():
    yield
    cpp.set_cpu_path(None)


def _first_nonfinite_output(named: dict, has_target) -> str | None:
    """The first of dla, dots, norms with a NaN or an infinity, the DLA rows of tokens without a target
    left out (``has_target`` None: every token has its directions)."""
    for name in ("dla", "dots", "norms"):
        t = named.get(name)
        if t is None:
            continue
        t = np.asarray(t)
        if name == "dla" and has_target is not None:
            t = t[has_target]
        if not np.isfinite(t).all():
            return name
    return None


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 70), N=st.integers(1, 9), H=st.integers(1, 40), D=st.integers(1, 50), M=st.integers(0, 3),
       K=st.integers(1, 5), z_mult=st.sampled_from([1.0, 1e10, 1e17, 1e20]),
       scale_mult=st.sampled_from([1.0, 1e-30, 1e-38]), big_rows=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_kernel_reports_the_first_nonfinite_output(path, dtype, entry, T, N, H, D, M, K, z_mult, scale_mult,
                                                    big_rows, seed):
    cpp.set_cpu_path(path)
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    z = rnd(T, N, H)
    z[: big_rows * T // 3] *= z_mult  # some tokens large (their outputs may overflow), the others not
    z, W_O, dirs = z.to(dtype), rnd(N, H, D).to(dtype), rnd(K, D).to(dtype)
    extra = rnd(T, M, D).to(dtype) if entry == "fused gathered" and M else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(T, generator=g, dtype=torch.float64) + 0.5)
    n_small = big_rows * T // 3
    if n_small:  # small scales for the last tokens: their DLA overflows where dots do not
        scale[T - n_small:] *= scale_mult
    ids = torch.randint(-1, K, (T,), generator=g)  # tokens without a target: NaN DLA, not an error
    a = lambda t: cpp.kernel_array(t, dtype)  # noqa: E731
    arr = [a(z), a(W_O), a(dirs), cpp.kernel_array(scale.to(acc), acc)]
    ids_np = cpp.kernel_array(ids, torch.int64)
    _C, sfx = cpp.require_extension(), cpp.dtype_suffix(dtype)
    has_target = None
    if entry == "fused gathered":
        writers = cpp.kernel_array(torch.randint(0, N, (min(N, 3),), generator=g), torch.int64)
        names = ("dla", "dots", "norms")
        has_target = ids.numpy() >= 0
        def run(c):
            return getattr(_C, f"fused_attribution_{sfx}")(
                *arr, writers, None if extra is None else a(extra), direction_ids=ids_np, check_outputs=c)
    elif entry == "fused fixed":
        names = ("dla", "dots", "norms")
        def run(c):
            return getattr(_C, f"fused_attribution_{sfx}")(*arr, cpp.kernel_array(torch.arange(N), torch.int64),
                                                          check_outputs=c)
    elif entry == "dla fixed":
        names = ("dla", "norms")
        def run(c):
            return getattr(_C, f"dla_fixed_{sfx}")(*arr, norms=True, check_outputs=c)[:2]
    else:
        names = ("dla",)
        has_target = ids.numpy() >= 0
        table = getattr(_C, f"build_dla_table_{sfx}")(arr[1], arr[2]) if entry == "dla table" else None
        def run(c):
            return getattr(_C, f"dla_gathered_{sfx}")(*arr, ids_np, table=table, method="table" if entry == "dla table" else "unique",
                                                     norms=False, check_outputs=c)[:1]

    unchecked = run(False)  # without the check, a kernel returns whatever it computed
    first = _first_nonfinite_output(dict(zip(names, unchecked)), has_target)
    if first is None:
        assert bitwise_equal(run(True), unchecked)
    else:
        with pytest.raises(_C.NonFiniteOutput, match=f"^{first}$"):
            run(True)


def test_an_input_error_comes_before_an_output_error():
    """A NaN in z makes the outputs NaN too; the kernel names the input."""
    _C = cpp.require_extension()
    g = torch.Generator().manual_seed(0)
    z, W_O, dirs = (torch.randn(*s, generator=g) for s in ((9, 3, 8), (3, 8, 16), (2, 16)))
    z[4, 1, 2] = float("nan")
    arr = [cpp.kernel_array(t, torch.float32) for t in (z, W_O, dirs, torch.ones(9))]
    with pytest.raises(_C.NonFiniteInput, match="^z contains"):
        _C.fused_attribution_f32(*arr, cpp.kernel_array(torch.arange(3), torch.int64), check_finite=True,
                                 check_outputs=True)
    with pytest.raises(_C.NonFiniteOutput, match="^dla$"):
        _C.fused_attribution_f32(*arr, cpp.kernel_array(torch.arange(3), torch.int64), check_outputs=True)


@pytest.mark.parametrize("workload,overflow", [("K1", "dots"), ("K1", "dla"), ("K2n", "dla"), ("K2f", "dla")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_error_is_the_contracts(workload, overflow, dtype, monkeypatch):
    """fused_attribution on the cpp backend raises what the torch backend raises after its run: the
    first overflowed output, the inputs' largest magnitude and what to do -- and, with check_finite=False,
    returns the overflowed values instead."""
    kw = small_public_case(workload, dtype, seed=5)
    if overflow == "dots":
        kw["z"] = kw["z"] * 1e25  # dots ~ 1e50; the DLA ~ 1e25 fits
    else:
        kw["scale"][7] = 1e-38  # the DLA of token 7 overflows; dots and norms do not
        if "direction_ids" in kw:
            kw["direction_ids"][7] = 2
    expected = (rf"^the attribution overflowed float32: {overflow} has non-finite values although every input is "
                r"finite \(inputs up to .* in magnitude\); scale the inputs down, or use float64$")
    with pytest.raises(ValueError, match=expected):
        ef.fused_attribution(**kw, backend="cpp")
    with pytest.raises(ValueError, match=expected):
        ef.fused_attribution(**kw, backend="torch")
    out = ef.fused_attribution(**kw, backend="cpp", check_finite=False)
    assert not torch.isfinite(getattr(out, overflow)).all()
    # the torch backend's check runs after its run (run_backend); the cpp backend's in its kernels
    contract = importlib.import_module("erasure_fast.contract")
    monkeypatch.setattr(contract, "require_finite_outputs",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("checked outside the kernel")))
    with pytest.raises(ValueError, match=expected):
        ef.fused_attribution(**kw, backend="cpp")
