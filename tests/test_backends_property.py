"""Property tests of the contract: every available backend against the float64 torch reference,
on random shapes, strides (non-contiguous views) and dtypes."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import erasure_fast as ef
from erasure_fast.backends import torch_ref
from erasure_fast.contract import validate
from conftest import TOL_AMX_BF16, on_backend, rel_err, with_cpu_paths

BACKENDS = [b for b in ("torch", "cpp", "triton") if ef.available_backends()[b].available]
if os.environ.get("EF_REQUIRE_CPP") and "cpp" not in BACKENDS:
    raise RuntimeError(f"EF_REQUIRE_CPP is set but the C++ backend is unavailable: {ef.available_backends()['cpp'].detail}")

BACKENDS = with_cpu_paths(BACKENDS)  # "cpp@<path>": every C++ kernel path this CPU runs

# fp32 accumulation everywhere except fp64; errors are relative to max |reference|.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# (the amx path's bfloat16 kernel: conftest.TOL_AMX_BF16)
DTYPES = list(TOL)


def maybe_strided(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider buffer)."""
    if not strided:
        return t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] == 1
    return view


@st.composite
def problems(draw):
    T = draw(st.integers(1, 9))
    N = draw(st.integers(1, 6))
    H = draw(st.integers(1, 11))
    D = draw(st.integers(1, 21))
    M = draw(st.integers(0, 3))
    K = draw(st.integers(1, 5))
    W = draw(st.integers(0, N))
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(["fixed", "gathered", "logit_diff"]))
    strided = draw(st.booleans())
    center = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(T=T, N=N, H=H, D=D, M=M, K=K, W=W, dtype=dtype, mode=mode, strided=strided, center=center, seed=seed)


def make_inputs(p):
    g = torch.Generator().manual_seed(p["seed"])
    T, N, H, D, M, K = (p[k] for k in "TNHDMK")

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(p["dtype"])

    args = dict(
        z=maybe_strided(r(T, N, H), p["strided"]),
        W_O=maybe_strided(r(N, H, D), p["strided"]),
        directions=maybe_strided(r(K, D), p["strided"]),
        scale=torch.rand(T, generator=g, dtype=torch.float64) + 0.25,
        writers=torch.randperm(N, generator=g)[: p["W"]],
        extra_nodes=r(T, M, D) if M else None,
    )
    if p["mode"] != "fixed":
        ids = torch.randint(-1, K, (T,), generator=g)
        args["direction_ids"] = ids
        if p["mode"] == "logit_diff":
            args["incorrect_ids"] = torch.randint(0, K, (T,), generator=g)
    return args


def reference(args, center):
    """float64 torch backend on the same (already rounded) inputs."""
    as64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}
    pos = [as64.pop(k) for k in ("z", "W_O", "directions", "scale", "writers")]
    return torch_ref.run(validate(*pos, **as64, center=center))


def magnitude(args):
    """The reference on |inputs| (no centring, no incorrect row): the size of the terms each output
    sums. A sum that cancels (one small DLA value of a one-token, one-head case) has a rounding error
    of the order of its terms, not of itself, so errors are judged against the larger of the two."""
    a = {k: (v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}
    a.pop("incorrect_ids", None)
    return reference(a, center=False)


def err_vs_scale(ours: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor) -> float:
    """max |ours - ref| / max(max |ref|, max |mag|) over the finite reference (NaN patterns as rel_err)."""
    r = rel_err(ours, ref)
    fin = torch.isfinite(ref)
    if not fin.any():
        return r
    ref_max = ref.detach().double().cpu()[fin.cpu()].abs().max()
    mag_max = mag.detach().double().cpu()[fin.cpu()].abs().max()
    return r * float(ref_max) / max(float(ref_max), float(mag_max), 1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_backend_matches_float64_reference(backend, p):
    tol = TOL_AMX_BF16 if backend.endswith("@amx") and p["dtype"] == torch.bfloat16 else TOL[p["dtype"]]
    with on_backend(backend) as backend:
        check_backend(backend, p, tol)


def check_backend(backend, p, tol):
    if backend == "triton" and p["dtype"] == torch.float64:
        with pytest.raises(ValueError, match="float64"):  # Triton computes in fp32 and says so
            ef.fused_attribution(**make_inputs(p), center=p["center"], backend=backend)
        return
    args = make_inputs(p)
    ref = reference(args, p["center"])
    mag = magnitude(args)
    out = ef.fused_attribution(**args, center=p["center"], backend=backend)
    expect_dtype = torch.float64 if p["dtype"] == torch.float64 else torch.float32
    for name in ("dla", "dots", "norms"):
        ours, theirs = getattr(out, name), getattr(ref, name)
        assert ours.dtype == expect_dtype, (name, ours.dtype)
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        assert err_vs_scale(ours, theirs, getattr(mag, name)) <= tol, (name, p)
    if p["W"] == 0 and p["M"] == 0:  # DLA-only requests may skip the norms (the head-space fast paths)
        lean = ef.fused_attribution(**args, center=p["center"], backend=backend, with_norms=False)
        assert lean.norms is None
        assert err_vs_scale(lean.dla, ref.dla, mag.dla) <= tol, p
    if p["mode"] != "fixed":  # -1 ids mean "no target": NaN exactly there
        assert torch.equal(torch.isnan(out.dla).all(dim=1), args["direction_ids"] < 0)
    else:
        assert not torch.isnan(out.dla).any()
