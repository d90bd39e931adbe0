"""The capture engine (`erasure_fast.engine`) against TransformerLens's hook capture of the same model:
z of every head, MLP outputs, the embedding node and the final-norm scale, within 1e-5 relative (fp32)
and 1e-12 (fp64), on odd shapes, with and without compatibility mode (folded LayerNorm), attention-only
too; `attribute` through the engine against TransformerLens's cache; the choice of capture and its
refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erasure_fast as ef
from conftest import TL_MAJOR, build_model, rel_err
from erasure_fast.capture import capture
from erasure_fast.engine import EngineWeights, engine_capture, engine_problem
from tl_reference import check_against_cache, forward_calls

SHAPES = [dict(n_layers=3, n_heads=5, d_head=7, d_model=33, d_mlp=47, d_vocab=101),
          dict(n_layers=2, n_heads=3, d_head=16, d_model=24, d_mlp=64, d_vocab=57)]
CASES = [(i, compat, dtype) for i in range(len(SHAPES)) for compat in (False, True) for dtype in (torch.float32, torch.float64)]


def _attn_only(dtype):
    from test_layouts import _attn_only as make

    return make(dtype)


@pytest.mark.parametrize("shape, compat, dtype", CASES, ids=[f"s{i}-{'compat' if c else 'raw'}-{str(d)[6:]}" for i, c, d in CASES])
def test_engine_matches_hook_capture(shape, compat, dtype):
    model = build_model(**SHAPES[shape], compat=compat, dtype=dtype, seed=7 + shape)
    spec = ef.model_spec(model)
    assert engine_problem(model, spec) is None
    tokens = torch.randint(0, SHAPES[shape]["d_vocab"], (3, 19), generator=torch.Generator().manual_seed(shape))
    ref = capture(model, tokens, spec)
    got = engine_capture(spec, EngineWeights.from_model(model, spec), tokens)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name in ("z", "mlp_out", "embed", "scale"):
        assert getattr(got, name).dtype == dtype
        e = rel_err(getattr(got, name), getattr(ref, name))
        assert e <= tol, f"{name}: rel err {e:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_engine_on_an_attention_only_model(dtype):
    model = _attn_only(dtype)
    spec = ef.model_spec(model)
    tokens = torch.randint(0, spec.d_vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    ref = capture(model, tokens, spec)
    got = engine_capture(spec, EngineWeights.from_model(model, spec), tokens)
    assert got.mlp_out is None and ref.mlp_out is None
    for name in ("z", "embed", "scale"):
        assert rel_err(getattr(got, name), getattr(ref, name)) <= (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("compat", [False, True], ids=["raw", "compat"])
def test_attribute_through_the_engine_matches_transformer_lens(compat):
    model = build_model(**SHAPES[0], compat=compat, seed=3)
    tokens = torch.randint(0, SHAPES[0]["d_vocab"], (2, 13), generator=torch.Generator().manual_seed(1))
    assert ef.attribute(model, tokens, writers=["L0H1"]).capture == "engine"  # the default where it covers the model
    check_against_cache(model, tokens, writer=1, label=f"engine {'compat' if compat else 'raw'}", dtype=torch.float32,
                        backends=["torch", "cpp"], tol=1e-5)
    hooks = ef.attribute(model, tokens, writers="all", capture="hooks")
    engine = ef.attribute(model, tokens, writers="all", capture="engine")
    assert hooks.capture == "hooks" and engine.capture == "engine"
    for field in ("dla", "pr", "resid_pr", "adjusted_dla"):
        assert rel_err(getattr(engine, field), getattr(hooks, field)) <= 1e-5, field


def test_capture_choice_is_checked_before_any_work():
    model = build_model(**SHAPES[1], seed=1)
    tokens = torch.randint(0, SHAPES[1]["d_vocab"], (1, 5))
    with pytest.raises(ValueError, match="capture must be one of"):
        ef.attribute(model, tokens, capture="fast")
    with pytest.raises(ValueError, match="capture must be one of"):
        ef.scan(model, np.zeros((2, 4), dtype=np.int64), capture="fast", out_dir="unused", progress=False)


def test_models_the_engine_does_not_cover_fall_back_to_hooks_and_say_why(tmp_path):
    """TransformerLens 4: a Hugging Face-loaded bridge in compatibility mode (processed weights);
    TransformerLens 3: a rotary RMSNorm model."""
    if TL_MAJOR >= 4:
        import warnings

        from hf_families import VOCAB, boot_bridge, save_family

        model, family = boot_bridge(save_family("LlamaForCausalLM", str(tmp_path / "llama"))), "LlamaForCausalLM"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.enable_compatibility_mode(disable_warnings=True)
    else:
        from test_layouts import _hooked

        model, VOCAB = _hooked("llama (RMS, GQA, gated)", torch.float32), 97
        family = ef.model_spec(model).family
    tokens = torch.randint(2, VOCAB, (1, 6))
    calls = forward_calls(model)
    with pytest.raises(ValueError, match=f"capture='engine': {family}: "):
        ef.attribute(model, tokens, capture="engine")
    assert not calls
    res = ef.attribute(model, tokens, writers=["L0H1"])
    assert res.capture == "hooks" and res.capture_reason.startswith(f"{family}: ") and calls


def test_scan_records_its_capture_and_interventions_keep_hooks(tmp_path):
    model = build_model(**SHAPES[0], seed=2)
    rows = np.random.default_rng(1).integers(0, SHAPES[0]["d_vocab"], size=(6, 12)).astype(np.int64)
    engine = ef.scan(model, rows, writers=["L0H1"], out_dir=str(tmp_path / "e"), progress=False)
    hooks = ef.scan(model, rows, writers=["L0H1"], out_dir=str(tmp_path / "h"), progress=False, capture="hooks")
    assert engine.meta["capture"] == "engine" and hooks.meta["capture"] == "hooks"
    assert "capture engine" in (tmp_path / "e" / "report.md").read_text()
    a, b = engine.summary, hooks.summary
    assert np.allclose(a["mean"].to_numpy(float), b["mean"].to_numpy(float), rtol=1e-4, atol=1e-6, equal_nan=True)
    from erasure_fast.paper.common import attribute_with_hooks

    kept = attribute_with_hooks(model, torch.from_numpy(rows[:1]), ["L0H1"], keep_hooks=("blocks.1.ln1.hook_scale",))
    assert kept.capture == "hooks" and "blocks.1.ln1.hook_scale" in kept.extra
