"""Parity with TransformerLens (4.x bridge or 3.x HookedTransformer, whichever is installed).

References are TransformerLens's own numbers: ``cache.logit_attrs`` of
``cache.stack_head_results(layer=-1, apply_ln=False)`` for DLA, and the paper's projection ratio
computed in float64 from TransformerLens's cached head results, MLP outputs and residual stream.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import erasure_fast as ef
from conftest import GELU_4L, TL_MAJOR, build_model, on_backend, record_error, rel_err, with_cpu_paths

BACKENDS = with_cpu_paths(["torch", "cpp"])  # "cpp@<path>": every C++ kernel path this CPU runs
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}

SHAPES = {
    "3x5_dh24_dm120": dict(n_layers=3, n_heads=5, d_head=24, d_model=120, d_mlp=200, d_vocab=301),
    "2x3_dh7_dm33": dict(n_layers=2, n_heads=3, d_head=7, d_model=33, d_mlp=50, d_vocab=97),
    "1x1_dh5_dm16": dict(n_layers=1, n_heads=1, d_head=5, d_model=16, d_mlp=8, d_vocab=11),
}


@pytest.fixture(autouse=True)
def _kernel_path(request):
    """Selects the C++ kernel path of a "cpp@<path>" backend parameter for the test."""
    params = getattr(request.node, "callspec", None)
    with on_backend(params.params.get("backend", "torch") if params else "torch"):
        yield


def need_backend(name: str) -> str:
    """The backend name of a parameter ("cpp@avx2" -> "cpp"), skipping the test where it is unavailable."""
    name = name.partition("@")[0]
    info = ef.available_backends()[name]
    if not info.available:
        if os.environ.get("EF_REQUIRE_CPP") and name == "cpp":
            pytest.fail(f"C++ backend required (EF_REQUIRE_CPP set) but unavailable: {info.detail}")
        pytest.skip(f"{name} backend unavailable: {info.detail}")
    return name


@functools.lru_cache(maxsize=None)
def cached_model(shape: str, compat: bool, dtype: torch.dtype):
    dims = GELU_4L if shape == "gelu4l" else SHAPES[shape]
    return build_model(**dims, compat=compat, dtype=dtype, seed=hash(shape) % 1000)


def tokens_for(model, batch: int, pos: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)


def tl_reference(model, tokens):
    """TransformerLens's stack, MLP outputs and residual points, float64 copies."""
    _, cache = model.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, apply_ln=False)  # [n, B, P, D]
    L = model.cfg.n_layers
    mlp = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])
    resid = [cache["blocks.0.hook_resid_pre"]]
    for l in range(L):
        resid += [cache[f"blocks.{l}.hook_resid_mid"], cache[f"blocks.{l}.hook_resid_post"]]
    return cache, stack, mlp, torch.stack(resid)


def pr_reference(nodes: torch.Tensor, writers: torch.Tensor) -> torch.Tensor:
    """Paper's PR (a.w)/(w.w) in float64. nodes [A, B, P, D], writers [W, B, P, D] -> [B, P, A, W]."""
    a, w = nodes.double(), writers.double()
    dots = torch.einsum("abpd,wbpd->bpaw", a, w)
    ww = (w * w).sum(-1).permute(1, 2, 0)[:, :, None, :]
    return torch.where(ww == 0, torch.full_like(dots, float("nan")), dots / ww)


def head_major(dla: torch.Tensor) -> torch.Tensor:
    """[B, P, L, H] -> TransformerLens layout [L*H, B, P]."""
    B, P = dla.shape[:2]
    return dla.reshape(B, P, -1).permute(2, 0, 1)


CASES = [(s, c, d, b) for s in SHAPES for c in (False, True) for d in (torch.float32, torch.float64) for b in BACKENDS]


@pytest.mark.parametrize("shape,compat,dtype,backend", CASES)
def test_attribute_matches_transformer_lens(shape, compat, dtype, backend):
    backend = need_backend(backend)
    model = cached_model(shape, compat, dtype)
    tokens = tokens_for(model, 3, 11, seed=1)
    cache, stack, mlp, resid = tl_reference(model, tokens)
    tag = f"{'compat' if compat else 'raw'}"
    res = ef.attribute(model, tokens, backend=backend)
    assert res.backend == backend

    # next-token DLA: TL's logit_attrs with the next tokens; our last position has no target -> NaN
    nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    ref = cache.logit_attrs(stack, nxt)
    ours = head_major(res.dla)
    assert torch.isnan(ours[:, :, -1]).all()
    err = rel_err(ours[:, :, :-1], ref[:, :, :-1])
    record_error(f"attribute dla next-token ({tag})", dtype, backend, err)
    assert err < TOL[dtype]

    # projection ratio of every head and MLP onto every head
    pr_ref = pr_reference(torch.cat([stack, mlp]), stack)
    err = rel_err(res.pr, pr_ref)
    record_error(f"attribute pr ({tag})", dtype, backend, err)
    assert err < TOL[dtype]

    # residual-stream PR (ours by linearity, reference from TL's cached residual stream)
    rpr_ref = pr_reference(resid, stack)
    assert res.resid_labels[0] == "resid_pre0" and len(res.resid_labels) == resid.shape[0]
    err = rel_err(res.resid_pr, rpr_ref)
    record_error(f"attribute resid_pr ({tag})", dtype, backend, err)
    assert err < 10 * TOL[dtype]

    # erasure-adjusted DLA from its definition on the reference numbers
    w_dla = ref.permute(1, 2, 0).double()  # [B, P, n]
    down = res.downstream.cpu()
    adj = w_dla * (1 + (pr_ref * down.double()).sum(-2))
    err = rel_err(res.adjusted_dla[:, :-1], adj[:, :-1])
    record_error(f"attribute adjusted_dla ({tag})", dtype, backend, err)
    assert err < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_token_and_logit_difference(dtype, backend):
    backend = need_backend(backend)
    model = cached_model("3x5_dh24_dm120", False, dtype)
    tokens = tokens_for(model, 2, 9, seed=2)
    cache, stack, _, _ = tl_reference(model, tokens)
    # one fixed token at every position
    res = ef.attribute(model, tokens, targets=17, include_mlps=False, backend=backend)
    err = rel_err(head_major(res.dla), cache.logit_attrs(stack, 17))
    record_error("attribute dla fixed token", dtype, backend, err)
    assert err < TOL[dtype]
    assert res.resid_pr is None and res.pr.shape[2] == 15
    # logit difference, per-position targets
    corr = tokens_for(model, 2, 9, seed=3)
    wrong = tokens_for(model, 2, 9, seed=4)
    res = ef.attribute(model, tokens, targets=corr, incorrect=wrong, writers=["L0H2", (1, 4)], backend=backend)
    err = rel_err(head_major(res.dla), cache.logit_attrs(stack, corr, incorrect_tokens=wrong))
    record_error("attribute dla logit difference", dtype, backend, err)
    assert err < TOL[dtype]
    assert res.writer_labels == ["L0H2", "L1H4"] and res.pr.shape[-1] == 2


TOKEN_FORMS = ["int", "batch_pos", "pos", "one_element", "batch"]


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("form", TOKEN_FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_attrs_heads_is_a_drop_in(compat, form, backend):
    backend = need_backend(backend)
    if form == "batch" and TL_MAJOR < 4:
        pytest.skip("a [batch] token tensor means one token per example only in TransformerLens 4")
    model = cached_model("3x5_dh24_dm120", compat, torch.float32)
    B, P = 3, 8
    tokens = tokens_for(model, B, P, seed=5)
    cache, stack, _, _ = tl_reference(model, tokens)
    forms = {
        "int": (5, 9),
        "batch_pos": (tokens_for(model, B, P, 6), tokens_for(model, B, P, 7)),
        "pos": (tokens_for(model, 1, P, 8)[0], tokens_for(model, 1, P, 9)[0]),
        "one_element": (torch.tensor([4]), torch.tensor([6])),
        "batch": (tokens_for(model, 1, B, 10)[0], tokens_for(model, 1, B, 11)[0]),
    }
    good, bad = forms[form]
    for incorrect in (None, bad):
        ref = cache.logit_attrs(stack, good, incorrect_tokens=incorrect)
        ours = ef.logit_attrs_heads(cache, good, incorrect, backend=backend)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        err = rel_err(ours, ref)
        record_error("logit_attrs_heads", torch.float32, backend, err)
        assert err < TOL[torch.float32]


def test_logit_attrs_heads_without_batch_dim():
    model = cached_model("2x3_dh7_dm33", False, torch.float64)
    tokens = tokens_for(model, 1, 6, seed=12)
    _, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    stack = cache.stack_head_results(layer=-1, apply_ln=False)
    ref = cache.logit_attrs(stack, tokens[0], has_batch_dim=False)
    ours = ef.logit_attrs_heads(cache, tokens[0])
    assert ours.shape == ref.shape == (6, 6)
    assert rel_err(ours, ref) < TOL[torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_writer_gives_nan_everywhere(backend):
    """A head whose output is zero: its PR / PV / cos are NaN (math page), in every backend."""
    backend = need_backend(backend)
    model = build_model(**SHAPES["2x3_dh7_dm33"], dtype=torch.float64, seed=3)
    with torch.no_grad():
        model.blocks[0].attn.W_O[1].zero_() if TL_MAJOR < 4 else None
        if TL_MAJOR >= 4:  # bridge: zero the rows of the output projection that head 1 feeds
            o = model.blocks[0].attn.o._original_component if hasattr(model.blocks[0].attn.o, "_original_component") else model.blocks[0].attn.o
            d_head = model.cfg.d_head
            o.weight[:, d_head:2 * d_head].zero_()
    assert float(model.W_O[0, 1].detach().abs().max()) == 0.0
    tokens = tokens_for(model, 2, 5, seed=13)
    cache, stack, mlp, _ = tl_reference(model, tokens)
    res = ef.attribute(model, tokens, writers=["L0H1", "L0H2"], backend=backend)
    assert torch.isnan(res.pr[..., 0]).all() and torch.isnan(res.pv[..., 0]).all() and torch.isnan(res.cos[..., 0]).all()
    assert not torch.isnan(res.pr[..., 1]).any()
    assert torch.isnan(res.resid_pr[..., 0]).all()
    pr_ref = pr_reference(torch.cat([stack, mlp]), stack[[1, 2]])
    assert rel_err(res.pr, pr_ref) < TOL[torch.float64]
    assert (res.dla[:, :-1, 0, 1] == 0).all()


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu4l_shape(compat, backend):
    backend = need_backend(backend)
    model = cached_model("gelu4l", compat, torch.float32)
    tokens = tokens_for(model, 2, 33, seed=14)
    cache, stack, mlp, resid = tl_reference(model, tokens)
    res = ef.attribute(model, tokens, backend=backend)
    nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    ref = cache.logit_attrs(stack, nxt)
    tag = "compat" if compat else "raw"
    checks = {
        "dla": (head_major(res.dla)[:, :, :-1], ref[:, :, :-1]),
        "pr": (res.pr, pr_reference(torch.cat([stack, mlp]), stack)),
        "resid_pr": (res.resid_pr, pr_reference(resid, stack)),
    }
    for name, (ours, theirs) in checks.items():
        err = rel_err(ours, theirs)
        record_error(f"GELU-4L shape {name} ({tag})", torch.float32, backend, err)
        assert err < (10 if name == "resid_pr" else 1) * TOL[torch.float32], name
