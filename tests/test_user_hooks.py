"""The user's model is the model analysed: hooks attached to it (TransformerLens hook points, torch
forward / pre-hooks on any module, global module hooks) are run through -- the numbers are those of
TransformerLens's own cache of the hooked model -- or refused in one line naming the hook, never
silently left out; the result and the scan's report say which capture ran and why."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import erasure_fast as ef
from conftest import build_model
from tl_reference import check_against_cache

SMALL = dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64)


@pytest.fixture()
def model():
    m = build_model(**SMALL, seed=7)
    yield m
    m.reset_hooks(including_permanent=True)


def tokens():
    return torch.randint(0, SMALL["d_vocab"], (2, 9), generator=torch.Generator().manual_seed(0))


def zero_head2(z, hook):
    z[:, :, 2] = 0.0
    return z


def test_a_transformer_lens_hook_is_run_through(model):
    """The issue's case: L0H2 zeroed by a hook on blocks.0.attn.hook_z. Its DLA is 0 (it was 0.38 on
    the engine, which ran without the hook), and every number equals TransformerLens's cache of the
    hooked model -- DLA, PR of every node, residual PR (read from the hooked stream), adjusted DLA."""
    x = tokens()
    plain = ef.attribute(model, x, writers=["L0H2"])
    assert plain.capture == "engine" and plain.dla[:, :-1, 0, 2].abs().max() > 0.1
    model.add_hook("blocks.0.attn.hook_z", zero_head2)
    res = ef.attribute(model, x, writers=["L0H2"])
    assert torch.equal(res.dla[:, :-1, 0, 2], torch.zeros(2, 8))
    assert res.capture_description == "hooks (through the model's own hooks: forward hook zero_head2 on blocks.0.attn.hook_z)"
    check_against_cache(model, x, writer=2, label="hooked model", dtype=torch.float32, backends=("torch", "cpp"), tol=1e-5)


def test_a_hook_that_changes_the_stream_itself_gives_the_streams_residual_points(model):
    """A hook on blocks.0.hook_attn_out halves what layer 0's attention adds: the residual stream is no
    longer the sum of the heads' z.W_O, so its points are read from the stream (as TransformerLens's
    cache has them), not summed from the nodes."""
    model.add_hook("blocks.0.hook_attn_out", lambda out, hook: out * 0.5)
    x = tokens()
    check_against_cache(model, x, writer=2, label="stream hook", dtype=torch.float32, backends=("cpp",), tol=1e-5)
    summed = ef.attribute(model, x, writers=["L0H2"], capture="hooks")
    model.reset_hooks()
    assert not torch.allclose(summed.resid_pr, ef.attribute(model, x, writers=["L0H2"]).resid_pr)


def test_a_torch_hook_on_a_module_of_a_transformer_lens_model_is_run_through(model):
    def ablate(module, args, out):  # layer 0's attention adds nothing to the stream
        return (out[0] * 0.0,) + tuple(out[1:]) if isinstance(out, tuple) else out * 0.0

    handle = model.blocks[0].attn.register_forward_hook(ablate)
    try:
        x = tokens()
        res = ef.attribute(model, x, writers=["L0H2"])
        assert res.capture_description == "hooks (through the model's own hooks: forward hook ablate on blocks.0.attn)"
        check_against_cache(model, x, writer=2, label="module hook", dtype=torch.float32, backends=("cpp",), tol=1e-5)
    finally:
        handle.remove()


def test_capture_engine_with_hooks_attached_is_refused(model):
    model.add_hook("blocks.0.attn.hook_z", zero_head2)
    with pytest.raises(ValueError, match=r"capture='engine': the model has hooks attached \(forward hook zero_head2 on "
                                         r"blocks.0.attn.hook_z\), which the engine does not run"):
        ef.attribute(model, tokens(), capture="engine")


@pytest.mark.parametrize("where", ["ln_final", "unembed", "model"])
def test_hooks_where_the_forward_pass_never_gets_are_refused(model, where):
    """The pass stops at the last block (no final norm, no unembedding) and TransformerLens's
    run_with_hooks does not call the model itself: such a hook would silently not run."""
    module = model if where == "model" else getattr(model, where)
    handle = module.register_forward_hook(lambda module, args, out: out)
    try:
        on = "the model itself" if where == "model" else where
        with pytest.raises(ValueError, match=rf"model: forward hook <lambda> on {on}: erasure_fast's forward pass stops"):
            ef.attribute(model, tokens())
    finally:
        handle.remove()


def test_a_global_module_hook_is_run_through_on_a_transformer_lens_model(model):
    from torch.nn.modules.module import register_module_forward_hook

    def scale_mlps(module, args, out):
        return out * 0.5 if type(module).__name__ == "MLPBridge" else None

    handle = register_module_forward_hook(scale_mlps)
    try:
        x = tokens()
        res = ef.attribute(model, x, writers=["L0H2"])
        assert res.capture_description == "hooks (through the model's own hooks: global forward hook scale_mlps on every module)"
        with pytest.raises(ValueError, match="capture='engine': the model has hooks attached"):
            ef.attribute(model, x, capture="engine")
        check_against_cache(model, x, writer=2, label="global hook", dtype=torch.float32, backends=("cpp",), tol=1e-5)
    finally:
        handle.remove()


def _gpt2(tmp_path):
    import transformers
    from hf_families import save_family

    return transformers.AutoModelForCausalLM.from_pretrained(save_family("GPT2LMHeadModel", str(tmp_path / "gpt2"))).eval()


def test_a_hooked_transformers_model_is_refused_naming_the_hook(tmp_path):
    """The issue's Hugging Face case: a forward hook that ablates layer-0 attention changed nothing, on
    either capture -- erasure_fast bridges a copy of the modules, which does not run it. Refused now,
    by attribute and scan alike, and the model is left as it was."""
    hf = _gpt2(tmp_path)
    x = torch.randint(2, 90, (1, 7))
    hf(x)  # transformers installs its own (record-only) output-capturing hooks: those are no change to the model
    assert ef.attribute(hf, x).capture == "engine"
    handle = hf.transformer.h[0].attn.register_forward_hook(lambda module, args, out: (out[0] * 0.0,) + out[1:])
    refusal = (r"model: this transformers model has hooks attached \(forward hook <lambda> on transformer.h.0.attn\); "
               r"erasure_fast analyses it through a TransformerLens bridge of a copy")
    for capture in ("auto", "hooks", "engine"):
        with pytest.raises(ValueError, match=refusal):
            ef.attribute(hf, x, capture=capture)
    with pytest.raises(ValueError, match=refusal):
        ef.scan(hf, np.random.default_rng(0).integers(2, 90, size=(4, 8)), out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    pre = hf.transformer.h[1].mlp.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match=r"forward pre-hook <lambda> on transformer.h.1.mlp"):
        ef.attribute(hf, x)
    assert len(hf.transformer.h[0].attn._forward_hooks) == 1
    handle.remove()
    pre.remove()
    assert ef.attribute(hf, x).capture == "engine"


@pytest.mark.parametrize("cls", ["LanguageModel", "TransformersModel"])
def test_a_hooked_nnsight_model_is_refused_naming_the_hook(tmp_path, cls):
    nnsight = pytest.importorskip("nnsight")
    from hf_families import word_tokenizer

    hf = _gpt2(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nnsight 0.8 deprecates LanguageModel, still in use
        lm = getattr(nnsight, cls)(hf, tokenizer=word_tokenizer())
    handle = hf.transformer.h[0].attn.register_forward_hook(lambda module, args, out: out)
    try:
        with pytest.raises(ValueError, match=rf"model: this nnsight {cls} has hooks attached \(forward hook "
                                             r"<lambda> on transformer.h.0.attn\)"):
            ef.attribute(lm, torch.randint(2, 90, (1, 7)))
    finally:
        handle.remove()


def test_a_scan_of_a_hooked_model_runs_through_the_hooks_and_says_so(model, tmp_path):
    rows = np.random.default_rng(1).integers(0, SMALL["d_vocab"], size=(6, 12)).astype(np.int64)
    model.add_hook("blocks.0.attn.hook_z", zero_head2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every ratio onto the zeroed writer is NaN: fig 1 says so, no empty legend
        res = ef.scan(model, rows, writers=["L0H2"], out_dir=tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "fig1_resid_pr.png").is_file()
    reason = "through the model's own hooks: forward hook zero_head2 on blocks.0.attn.hook_z"
    why = f"hooks ({reason})"
    assert (res.meta["capture"], res.meta["capture_reason"]) == ("hooks", reason)
    meta = json.loads((tmp_path / "o" / "summary.json").read_text())["meta"]
    assert (meta["capture"], meta["capture_reason"]) == ("hooks", reason)
    assert f"capture {why}" in (tmp_path / "o" / "report.md").read_text()
    dla = res.summary[(res.summary.kind == "dla") & (res.summary.node == "L0H2")].iloc[0]
    assert dla["mean"] == 0.0 and abs(dla["median"]) <= 0.01  # L0H2 zeroed by the hook: no DLA (histogram bin 0.01)
