"""The C++ kernels' own finiteness check of their inputs (csrc/kernel_common.h, nonfinite_bit; the
weights: csrc/weight_checks.h): with check_finite=True every fused and DLA-only kernel, on every path
this CPU runs and in every dtype, checks z and extra_nodes as it reads them, and W_O and the rows of
directions it reads before it starts, and raises `_C.NonFiniteInput` for any NaN or infinity
anywhere in them; finite values (the largest included) and a bad value in a row of directions the
call does not read pass and leave the outputs bitwise as they are without the check. The public calls
then raise the contract's error, word for word what the torch backend raises before it runs."""

from __future__ import annotations

import importlib

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
# fused K1-like (writers, extra nodes), fused fixed set, DLA-only fixed with norms (the Gram stage) and
# without (z checked through the DLA it makes), DLA-only gathered by unique reduction and from a table
ENTRIES = ["fused gathered", "fused fixed", "dla fixed", "dla fixed no norms", "dla gathered", "dla table"]
BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(autouse=True)
def _default_path_after():
    yield
    cpp.set_cpu_path(None)


def _entry_call(entry: str, dtype, arr: list, writers, ids, inc=None, extra=None, table=None):
    """run(check_finite) -> the outputs of ``entry``'s `_C` function (one of ENTRIES) on the kernel
    arrays ``arr`` (z, W_O, directions, scale): the fused kernel with ``writers`` (and ``extra``, the
    ids in its gathered mode), the DLA-only kernels with the ids, from ``table`` for "dla table"."""
    _C, sfx = cpp.require_extension(), cpp.dtype_suffix(dtype)
    if entry.startswith("fused"):
        gathered = dict(direction_ids=ids, incorrect_ids=inc) if entry == "fused gathered" else {}
        return lambda c: getattr(_C, f"fused_attribution_{sfx}")(*arr, writers, extra, **gathered, check_finite=c)
    if entry.startswith("dla fixed"):
        return lambda c: getattr(_C, f"dla_fixed_{sfx}")(*arr, norms=entry == "dla fixed", check_finite=c)[:2]
    return lambda c: getattr(_C, f"dla_gathered_{sfx}")(*arr, ids, inc, table=table,
                                                       method="table" if entry == "dla table" else "unique",
                                                       norms=False, check_finite=c)[:1]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 70), N=st.integers(1, 9), H=st.integers(1, 40), D=st.integers(1, 50), M=st.integers(0, 3),
       K=st.integers(1, 5), bad=st.sampled_from(BAD_VALUES + ["largest", None]), in_extra=st.booleans(),
       where=st.floats(0, 1, exclude_max=True), seed=st.integers(0, 2**16))
def test_kernel_finds_any_nonfinite_activation(path, dtype, entry, T, N, H, D, M, K, bad, in_extra, where, seed):
    cpp.set_cpu_path(path)
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    z, W_O, dirs = rnd(T, N, H), rnd(N, H, D), rnd(K, D)
    extra = rnd(T, M, D) if entry == "fused gathered" and M else None
    target_is_extra = in_extra and extra is not None
    if bad is not None:
        t = extra if target_is_extra else z
        t.view(-1)[int(where * t.numel())] = torch.finfo(dtype).max if bad == "largest" else bad
    scale = torch.rand(T, generator=g, dtype=torch.float64) + 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ids = torch.randint(-1, K, (T,), generator=g)  # tokens without a target: their z is checked too
    a = lambda t: cpp.kernel_array(t, dtype)  # noqa: E731
    arr = [a(z), a(W_O), a(dirs), cpp.kernel_array(scale.to(acc), acc)]
    ids_np = cpp.kernel_array(ids, torch.int64)
    _C, sfx = cpp.require_extension(), cpp.dtype_suffix(dtype)
    writers = torch.randint(0, N, (min(N, 3),), generator=g) if entry == "fused gathered" else torch.arange(N)
    table = getattr(_C, f"build_dla_table_{sfx}")(arr[1], arr[2]) if entry == "dla table" else None
    run = _entry_call(entry, dtype, arr, cpp.kernel_array(writers, torch.int64), ids_np,
                      extra=None if extra is None else a(extra), table=table)

    unchecked = run(False)  # without the check, a kernel computes whatever it reads
    if bad in BAD_VALUES:
        name = "extra_nodes" if target_is_extra else "z"
        with pytest.raises(_C.NonFiniteInput, match=f"^{name} contains non-finite values$"):
            run(True)
    else:
        assert bitwise_equal(run(True), unchecked)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 70), N=st.integers(1, 9), H=st.integers(1, 40), D=st.integers(1, 50), K=st.integers(1, 5),
       bad=st.sampled_from(BAD_VALUES + ["largest"]), in_dirs=st.booleans(), where=st.floats(0, 1, exclude_max=True),
       with_inc=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_finds_any_nonfinite_weight(path, dtype, entry, T, N, H, D, K, bad, in_dirs, where, with_inc, seed):
    """W_O anywhere, or directions in a row the call reads (every row without ids; a row an id or a
    wrong id names with them): NonFiniteInput naming it. A row no id names is not read, so a bad value
    there passes, as finite values do, with the outputs' bits unchanged."""
    cpp.set_cpu_path(path)
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    z, W_O, dirs = rnd(T, N, H), rnd(N, H, D), rnd(K, D)
    gathered = entry in ("fused gathered", "dla gathered", "dla table")
    ids = torch.randint(-1, K, (T,), generator=g)
    inc = torch.randint(-1, K, (T,), generator=g) if with_inc and entry != "dla table" else None
    read = set(range(K)) if not gathered else {int(i) for i in ids if i >= 0} | (
        set() if inc is None else {int(i) for i in inc if i >= 0})
    t = dirs if in_dirs else W_O
    flat = int(where * t.numel())
    t.view(-1)[flat] = torch.finfo(dtype).max if bad == "largest" else bad
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.rand(T, generator=g, dtype=torch.float64) + 0.5
    a = lambda x: cpp.kernel_array(x, dtype)  # noqa: E731
    arr = [a(z), a(W_O), a(dirs), cpp.kernel_array(scale.to(acc), acc)]
    ids_np = cpp.kernel_array(ids, torch.int64)
    inc_np = None if inc is None else cpp.kernel_array(inc, torch.int64)
    _C, sfx = cpp.require_extension(), cpp.dtype_suffix(dtype)
    # a table is built from finite weights (its builder's inputs): the call's own weights are checked
    table = getattr(_C, f"build_dla_table_{sfx}")(a(rnd(N, H, D)), a(rnd(K, D))) if entry == "dla table" else None
    run = _entry_call(entry, dtype, arr, cpp.kernel_array(torch.arange(min(N, 3)), torch.int64), ids_np, inc_np,
                      table=table)

    unchecked = run(False)
    if bad in BAD_VALUES and (not in_dirs or flat // D in read):
        with pytest.raises(_C.NonFiniteInput, match=f"^{'directions' if in_dirs else 'W_O'} contains non-finite values$"):
            run(True)
    else:
        assert bitwise_equal(run(True), unchecked)


@pytest.mark.parametrize("workload,where", [("K1", "z"), ("K1", "extra_nodes"), ("K2n", "z"), ("K2f", "z"),
                                            ("K1", "W_O"), ("K2n", "W_O"), ("K2f", "W_O")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_error_is_the_contracts(workload, where, dtype, monkeypatch):
    """fused_attribution on the cpp backend raises what the torch backend raises before it runs: the
    input's name and its first bad index (two bad values: the first one is named)."""
    kw = small_public_case(workload, dtype, seed=3)
    t = kw[where]
    t[t.shape[0] // 2, 1, 5] = float("nan")
    t[t.shape[0] - 1, 0, 0] = float("inf")
    expected = rf"^{where} contains non-finite values \(first at index \[{t.shape[0] // 2}, 1, 5\]\)$"
    _same_error_as_torch(kw, expected, monkeypatch)


@pytest.mark.parametrize("workload", ["K1", "K2n", "K2f"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_error_names_the_first_input_in_the_contracts_order(workload, dtype, monkeypatch):
    """Bad values in several inputs: the cpp backend names the first in the contract's order (z, W_O,
    extra_nodes, directions), as the torch backend does, although it reads the weights before z; a bad
    directions row is named by its row in the full tensor, and one no id names is not an error."""
    kw = small_public_case(workload, dtype, seed=5)
    ids = kw.get("direction_ids")
    used = sorted({int(i) for i in ids if i >= 0}) if ids is not None else list(range(kw["directions"].shape[0]))
    unused = sorted(set(range(kw["directions"].shape[0])) - set(used))
    if unused:
        kw["directions"][unused[0], 3] = float("nan")  # never read: no error
        ef.fused_attribution(**kw, backend="cpp")
    kw["directions"][used[-1], 4] = float("inf")
    _same_error_as_torch(kw, rf"^directions contains non-finite values \(first at index \[{used[-1]}, 4\]\)$",
                         monkeypatch)
    kw["W_O"][2, 3, 1] = float("-inf")
    _same_error_as_torch(kw, r"^W_O contains non-finite values \(first at index \[2, 3, 1\]\)$", monkeypatch)
    kw["z"][7, 0, 2] = float("nan")
    _same_error_as_torch(kw, r"^z contains non-finite values \(first at index \[7, 0, 2\]\)$", monkeypatch)


def _same_error_as_torch(kw: dict, expected: str, monkeypatch) -> None:
    """fused_attribution raises ``expected`` on the cpp backend, and on the torch backend before it runs."""
    with pytest.raises(ValueError, match=expected):
        ef.fused_attribution(**kw, backend="cpp")
    torch_module = importlib.import_module("erasure_fast.backends")._module("torch")

    def boom(_inputs):
        raise AssertionError("the torch backend ran on non-finite activations")

    monkeypatch.setattr(torch_module, "run", boom)
    with pytest.raises(ValueError, match=expected):
        ef.fused_attribution(**kw, backend="torch")


def test_check_finite_false_leaves_the_activations_unchecked():
    """check_finite=False asks for no check anywhere: the cpp kernels compute with the NaN."""
    kw = small_public_case("K2f", torch.float32, seed=4)
    kw["z"][3, 2, 1] = float("nan")
    out = ef.fused_attribution(**kw, backend="cpp", check_finite=False)
    assert torch.isnan(out.dla[3, 2]).all() and torch.isfinite(out.dla[4:]).all()


def test_activation_checks_benchmark_runs(tmp_path):
    # benchmarks/activation_checks.py on a few tokens: a row per workload, dtype and cache state
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("activation_checks",
                                                  os.path.join(here, "..", "benchmarks", "activation_checks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--tokens", "70", "--rounds", "2", "--flush-mib", "8", "--out", str(tmp_path / "a.md")])
    rows = [line.split("|") for line in (tmp_path / "a.md").read_text().splitlines() if line.startswith("| K")]
    assert [(r[1].strip(), r[2].strip(), r[3].strip()) for r in rows] == [
        (w, d, c) for w in ("K1", "K2n", "K2f") for d in ("float32", "bfloat16") for c in ("warm", "cold", "trimmed")]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    text = module.main(["--outputs-only", "--tokens", "40", "--rounds", "2", "--flush-mib", "8", "--workloads", "K1",
                        "--dtypes", "bfloat16"])
    assert "with its outputs checked outside the kernel or in it" in text and "--outputs-only" in text
    assert len([line for line in text.splitlines() if line.startswith("| K1 | bfloat16 |")]) == 3
    with pytest.raises(SystemExit, match="unknown"):
        module.main(["--workloads", "K3"])
