"""Bad input gets a clear error naming the argument, before any backend runs. (The one exception, NaN
or infinity in z / extra_nodes on the cpp backend, whose kernels check them as they read them and
raise the same error before returning anything: test_activation_checks.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
import torch

import erasure_fast as ef
import importlib

from conftest import build_model

backend_registry = importlib.import_module("erasure_fast.backends")


@pytest.fixture
def no_backend_runs(monkeypatch):
    """Make every backend's run() fail loudly: a validation error must come first."""
    def boom(_inputs):
        raise AssertionError("a backend ran on invalid input")
    for name in ("torch", "cpp"):
        try:
            module = backend_registry._module(name)
        except ImportError:
            continue
        monkeypatch.setattr(module, "run", boom)


def good(T=5, N=4, H=3, D=7, K=6, M=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    return dict(
        z=r(T, N, H), W_O=r(N, H, D), directions=r(K, D), scale=r(T).abs() + 0.5,
        writers=[0, 2], extra_nodes=r(T, M, D), direction_ids=torch.randint(0, K, (T,), generator=g),
    )


def call(backend="auto", **kw):
    args = good()
    args.update(kw)
    pos = [args.pop(k) for k in ("z", "W_O", "directions", "scale", "writers")]
    return ef.fused_attribution(*pos, **args, backend=backend)


BAD = [
    ("z rank", dict(z=torch.randn(5, 4)), ValueError, "z must have shape"),
    ("z dtype", dict(z=torch.randint(0, 3, (5, 4, 3))), TypeError, "z must have dtype"),
    ("z not a tensor", dict(z=[[1.0]]), TypeError, "z must be a torch.Tensor"),
    ("empty batch", dict(z=torch.randn(0, 4, 3), scale=torch.ones(0), extra_nodes=None, direction_ids=None), ValueError, "no tokens"),
    ("W_O heads mismatch", dict(W_O=torch.randn(5, 3, 7)), ValueError, "W_O must have shape"),
    ("W_O d_head mismatch", dict(W_O=torch.randn(4, 2, 7)), ValueError, "W_O must have shape"),
    ("W_O dtype mismatch", dict(W_O=torch.randn(4, 3, 7, dtype=torch.float64)), TypeError, "W_O has dtype"),
    ("directions d_model", dict(directions=torch.randn(6, 8)), ValueError, "directions must have shape"),
    ("directions empty", dict(directions=torch.randn(0, 7), direction_ids=None), ValueError, "directions has no rows"),
    ("scale shape", dict(scale=torch.ones(4)), ValueError, "scale must have shape"),
    ("scale zero", dict(scale=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])), ValueError, "scale must be finite and > 0"),
    ("scale nan", dict(scale=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])), ValueError, "scale must be finite"),
    ("scale inf", dict(scale=torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0])), ValueError, "scale must be finite"),
    ("writer too large", dict(writers=[0, 4]), ValueError, "writers must be head indices in \\[0, 4\\)"),
    ("writer negative", dict(writers=[-1]), ValueError, "writers must be head indices"),
    ("writer float tensor", dict(writers=torch.tensor([0.5])), TypeError, "writers must be integer"),
    ("writer junk", dict(writers=["a"]), TypeError, "writers must be a sequence of int"),
    # `attribute` refuses a head named twice; fused_attribution took it (each writer's column repeated)
    ("writer twice", dict(writers=[2, 0, 2]), ValueError, r"writers names head 2 more than once \(\[2, 0, 2\]\); list each"),
    ("extra_nodes shape", dict(extra_nodes=torch.randn(5, 2, 8)), ValueError, "extra_nodes must have shape"),
    ("extra_nodes tokens", dict(extra_nodes=torch.randn(4, 2, 7)), ValueError, "extra_nodes must have shape"),
    ("ids too large", dict(direction_ids=torch.tensor([0, 1, 2, 3, 6])), ValueError, "direction_ids must lie in \\[-1, 6\\)"),
    ("ids below -1", dict(direction_ids=torch.tensor([0, 1, -2, 3, 5])), ValueError, "direction_ids must lie in"),
    ("ids shape", dict(direction_ids=torch.tensor([0, 1])), ValueError, "direction_ids must have shape"),
    ("ids float", dict(direction_ids=torch.zeros(5)), TypeError, "direction_ids must be an integer tensor"),
    ("incorrect without ids", dict(direction_ids=None, incorrect_ids=torch.zeros(5, dtype=torch.long)), ValueError, "incorrect_ids needs direction_ids"),
    ("incorrect out of range", dict(incorrect_ids=torch.tensor([0, 1, 2, 3, 99])), ValueError, "incorrect_ids must lie in"),
    ("z nan", dict(z=torch.full((5, 4, 3), float("nan")), backend="torch"), ValueError, "z contains non-finite"),
    ("W_O inf", dict(W_O=torch.full((4, 3, 7), float("inf")), backend="torch"), ValueError, "W_O contains non-finite"),
    ("directions nan in a used row", dict(directions=torch.full((6, 7), float("nan")), backend="torch"), ValueError,
     "directions contains non-finite"),
    ("extra nan", dict(extra_nodes=torch.full((5, 2, 7), float("nan")), backend="torch"), ValueError,
     "extra_nodes contains non-finite"),
    ("unsupported dtype", dict(z=torch.randn(5, 4, 3).to(torch.complex64)), TypeError, "z must have dtype"),
]


@pytest.mark.parametrize("case,kw,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_fused_input(case, kw, exc, match, no_backend_runs):
    with pytest.raises(exc, match=match):
        call(**kw)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("where", [0, -1])
def test_large_input_nonfinite_found_in_any_block(layout, where, no_backend_runs):
    # inputs above the block size are checked block by block (bounded temporaries): a NaN in the
    # first or the last block must still be found, for contiguous and strided tensors
    T, N, H = 2100, 4, 128  # 1.07M values > one block
    z = torch.randn(T, N, H) if layout == "contiguous" else torch.randn(H, N, T).permute(2, 1, 0)
    z[where, -1, -1] = float("nan")
    kw = dict(z=z, scale=torch.ones(T), W_O=torch.randn(N, H, 7), extra_nodes=None,
              direction_ids=torch.zeros(T, dtype=torch.int64))
    with pytest.raises(ValueError, match="z contains non-finite"):
        call(backend="torch", **kw)  # checked here, before the backend (the cpp kernels check as they read)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_values_whose_sum_overflows_pass_and_one_bad_value_fails(dtype, no_backend_runs):
    """The check's fast path is a finite sum; finite values that overflow the sum take the exact path
    and pass, and a single infinity or NaN among them is still found."""
    from erasure_fast.contract import require_finite

    big = torch.finfo(dtype).max / 4
    t = torch.full((2100, 4, 128), big, dtype=dtype)  # above one block; the sum overflows
    require_finite("z", t)
    for bad in (float("inf"), float("-inf"), float("nan")):
        u = t.clone()
        u[1500, 2, 7] = bad
        with pytest.raises(ValueError, match=r"z contains non-finite values \(first at index \[1500, 2, 7\]\)"):
            require_finite("z", u)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf"), None]),
       where=st.floats(0, 1, exclude_max=True), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_all_finite_finds_any_bad_value(dtype, shape, bad, where, scale, seed):
    """all_finite against isfinite, on every float dtype's fast path: any one NaN or infinity, anywhere
    in a tensor of any shape and magnitude, is found; finite values pass."""
    from erasure_fast.finite import all_finite

    t = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)
    if bad is not None:
        t.view(-1)[int(where * t.numel())] = bad
    assert all_finite(t) == bool(torch.isfinite(t).all()) == (bad is None)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 60), cols=st.integers(1, 40), n_bad=st.integers(1, 4),
       block=st.sampled_from([1, 7, 64, 1 << 20]), contiguous=st.booleans(), seed=st.integers(0, 2**16))
def test_require_finite_names_the_first_bad_value(rows, cols, n_bad, block, contiguous, seed):
    """The error's index is the first NaN / infinity in row-major order, also when the tensor spans
    several blocks of the check (made small here; a contiguous tensor's flat view, any other along
    dim 0) and holds bad values in more than one of them."""
    from erasure_fast import finite
    from erasure_fast.finite import require_finite

    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g)
    flat = torch.randint(0, t.numel(), (n_bad,), generator=g)
    t.view(-1)[flat] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])[:n_bad]
    first = int(flat.min())
    if not contiguous:  # the same values, columns contiguous
        t = t.T.contiguous().T
    with pytest.MonkeyPatch.context() as mp, \
            pytest.raises(ValueError, match=rf"\(first at index \[{first // cols}, {first % cols}\]\)$"):
        mp.setattr(finite, "_FINITE_BLOCK", block)
        require_finite("z", t)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       n_rows=st.integers(1, 30), d=st.integers(1, 20), n_used=st.integers(0, 40),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf"), None]),
       in_used=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 2**16))
def test_require_finite_checks_exactly_the_named_rows(dtype, n_rows, d, n_used, bad, in_used, scale, seed):
    """Gathered directions: only the rows the ids name are checked, wherever the bad value is, and
    the error names its row in the full tensor."""
    from erasure_fast.finite import require_finite

    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n_rows, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    rows = torch.unique(torch.randint(0, n_rows, (n_used,), generator=g))
    unused = [r for r in range(n_rows) if r not in set(rows.tolist())]
    target = (rows.tolist() if in_used else unused) or None
    if bad is not None and target is not None:
        r = target[int(torch.randint(0, len(target), (1,), generator=g))]
        t[r, int(torch.randint(0, d, (1,), generator=g))] = bad
        if r in rows.tolist():
            first = int(rows[torch.isfinite(t[rows]).all(1).logical_not().nonzero()[0, 0]])
            with pytest.raises(ValueError, match=rf"directions contains non-finite values \(first at index \[{first}, "):
                require_finite("directions", t, rows)
            return
    require_finite("directions", t, rows)


def test_mixed_devices_are_rejected(no_backend_runs):
    meta = torch.randn(4, 3, 7, device="meta")
    with pytest.raises(ValueError, match="W_O is on meta but z is on cpu"):
        call(W_O=meta)


def test_unknown_backend(no_backend_runs):
    with pytest.raises(ValueError, match="backend must be one of"):
        ef.fused_attribution(**{k: v for k, v in good().items()}, backend="cuda-magic")


def test_unavailable_backend_is_refused_and_auto_falls_back(monkeypatch):
    """A backend that reports itself unavailable is refused by name; "auto" falls back to torch."""
    module = backend_registry._module("cpp")
    monkeypatch.setattr(module, "available", lambda: (False, "pretend the extension is missing"))
    monkeypatch.setattr(backend_registry, "_warned_missing", set())
    assert ef.available_backends()["cpp"] == (False, "pretend the extension is missing")
    with pytest.raises(ValueError, match="backend 'cpp' is not available here: pretend"):
        ef.fused_attribution(**good(), backend="cpp")
    with pytest.warns(UserWarning, match="cpp backend unavailable"):
        out = ef.fused_attribution(**good(), backend="auto")
    assert out.dla.shape == (5, 4)


@pytest.fixture(scope="module")
def small_model():
    return build_model(n_layers=2, n_heads=3, d_head=4, d_model=12, d_mlp=16, d_vocab=23)


MODEL_BAD = [
    ("token too large", dict(tokens=torch.tensor([[1, 23]])), ValueError, "tokens must lie in \\[0, d_vocab=23\\)"),
    ("token negative", dict(tokens=torch.tensor([[-1, 2]])), ValueError, "tokens must lie in"),
    ("token float", dict(tokens=torch.tensor([[1.0, 2.0]])), TypeError, "tokens must hold integer"),
    ("token rank", dict(tokens=torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "tokens must have shape"),
    ("token empty", dict(tokens=torch.zeros(2, 0, dtype=torch.long)), ValueError, "tokens is empty"),
    ("token list", dict(tokens=[[1, 2]]), TypeError, "tokens must be an integer torch.Tensor"),
    ("too long", dict(tokens=torch.zeros(1, 65, dtype=torch.long)), ValueError, "n_ctx is 64"),
    ("writer missing head", dict(writers=["L0H3"]), ValueError, "does not exist: the model has 2 layers x 3 heads"),
    ("writer missing layer", dict(writers=[(2, 0)]), ValueError, "does not exist"),
    ("writer index", dict(writers=[6]), ValueError, "head index 6 out of range"),
    ("writer label junk", dict(writers=["head2"]), ValueError, "not of the form"),
    ("writers empty", dict(writers=[]), ValueError, "writers is empty"),
    # writers=(1, 2) meant head L1H2 while [1, 2] meant flat heads 1 and 2: a bare pair is now refused
    ("writers bare pair", dict(writers=(1, 2)), ValueError,
     r"writers=\(1, 2\) is ambiguous: pass \[\(1, 2\)\] for head L1H2, or \[1, 2\] for the heads with flat indices 1 and 2"),
    ("writer float pair", dict(writers=[(1.0, 2)]), TypeError, r"a head must be an int, a \(layer, head\) pair of ints"),
    ("writer bool", dict(writers=[True]), TypeError, "a head must be an int"),
    ("target out of range", dict(targets=23), ValueError, "targets must lie in"),
    ("target shape", dict(targets=torch.zeros(3, dtype=torch.long)), ValueError, "targets must be an int, \\[batch\\]"),
    ("target string", dict(targets="prev"), ValueError, "targets must be \"next\""),
    ("incorrect next", dict(incorrect="next"), ValueError, "incorrect must be an int"),
    ("incorrect out of range", dict(incorrect=torch.full((2, 4), 30)), ValueError, "incorrect must lie in"),
    ("backend", dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("case,kw,exc,match", MODEL_BAD, ids=[b[0] for b in MODEL_BAD])
def test_bad_attribute_input(case, kw, exc, match, small_model, no_backend_runs):
    args = dict(tokens=torch.randint(0, 23, (2, 4)))
    args.update(kw)
    tokens = args.pop("tokens")
    with pytest.raises(exc, match=match):
        ef.attribute(small_model, tokens, **args)


def test_writers_of_every_integer_kind_and_pairs_in_a_list(small_model):
    import numpy as np

    tokens = torch.randint(0, 23, (2, 4))
    want = ef.attribute(small_model, tokens, writers=["L1H2", "L0H1"]).writer_labels
    for writers in ([(1, 2), (0, 1)], [5, 1], [np.int64(5), np.int32(1)], torch.tensor([5, 1])):
        assert ef.attribute(small_model, tokens, writers=writers).writer_labels == want, writers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_too_large_for_the_accumulation_are_an_error_not_nans(dtype):
    """Inputs x 1e30 gave all-NaN outputs without a word: their dots and norms overflow float32."""
    args = good(dtype=dtype)
    args["z"] = args["z"] * 1e30
    with pytest.raises(ValueError, match=r"the attribution overflowed float32: dots has non-finite values although every "
                                         r"input is finite \(inputs up to .*e\+30 in magnitude\); scale the inputs down"):
        ef.fused_attribution(**args)
    args64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in good().items()}
    args64["z"] = args64["z"] * 1e30
    out = ef.fused_attribution(**args64)  # float64 holds them
    assert torch.isfinite(out.dots).all() and torch.isfinite(out.norms).all()


def test_not_a_model():
    with pytest.raises(TypeError, match="model must be a TransformerLens"):
        ef.attribute(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))


def test_logit_attrs_heads_bad_tokens(small_model, no_backend_runs):
    tokens = torch.randint(0, 23, (2, 4))
    _, cache = small_model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="tokens must lie in"):
        ef.logit_attrs_heads(cache, 99)
    with pytest.raises(ValueError, match="does not broadcast"):
        ef.logit_attrs_heads(cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        ef.logit_attrs_heads(cache, torch.zeros(2, 4, dtype=torch.long), 3)


def test_derive_measures_nan_policy():
    dots = torch.tensor([[[2.0, 0.0]], [[1.0, 3.0]]])  # [T=2, nodes=1, W=2]
    norms = torch.tensor([[4.0], [0.0]])  # node 0 is the writer; token 1 has a zero writer
    m = ef.derive_measures(dots, norms, torch.tensor([0, 0]))
    assert m.pr[0, 0, 0] == 0.5 and m.pv[0, 0, 0] == 1.0 and m.cos[0, 0, 0] == 0.5
    assert torch.isnan(m.pr[1]).all() and torch.isnan(m.pv[1]).all() and torch.isnan(m.cos[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_downstream_pr_sum_is_the_sum_of_the_downstream_ratios_and_keeps_a_bad_dot_to_its_writer(dtype):
    """downstream_pr_sum (one GEMM over the dots read in place, a division per writer) against the
    definition sum_n downstream[n, w] * PR[n, w], on a token-strided view of the dots as the attribution
    returns them; an inf or NaN dot spoils only its own writer's sum (and only if it is downstream)."""
    from erasure_fast.attribution import AttributionResult
    from erasure_fast.contract import projection_ratio

    g = torch.Generator().manual_seed(5)
    B, P, N, W = 3, 7, 11, 5
    full = torch.randn(B, P, N + 2, W, generator=g, dtype=torch.float64).to(dtype)
    dots = full[:, :, :N]
    norms = (torch.rand(B, P, N, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    norms[0, 0, 2] = 0.0  # writer 1 (node 2) has no norm at this token: NaN
    writers = torch.tensor([0, 2, 4, 6, 9])
    mask = torch.rand(N, W, generator=g) < 0.5
    mask[3, 3], mask[5, 0] = True, False
    dots[1, 2, 3, 3] = float("inf")  # downstream: writer 3's sum is inf (or NaN), the others are finite
    dots[2, 4, 5, 0] = float("nan")  # not downstream of writer 0; still NaN * 0 = NaN in the definition
    res = AttributionResult(dla=torch.zeros(B, P, 1, N), dots=dots, norms=norms, node_labels=[str(i) for i in range(N)],
                            writers=writers, writer_labels=[str(int(w)) for w in writers], resid_dots=None,
                            resid_labels=[], downstream=mask, backend="test")
    want = (projection_ratio(dots, norms, writers) * mask.to(dtype)).sum(dim=-2)
    got = res.downstream_pr_sum
    assert got.shape == (B, P, W)
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6, equal_nan=True)
    assert torch.isnan(got[0, 0, 1]) and not torch.isfinite(got[1, 2, 3]) and torch.isnan(got[2, 4, 0])
    assert torch.isfinite(got[1, 2, [0, 1, 2, 4]]).all() and torch.isfinite(got[2, 4, 1:]).all()
