"""The capture engine on every Hugging Face family (tests/hf_families.py's tiny random models): for each
family TransformerLens bridges, in float32 and float64, either the engine's `Capture` equals hook
capture's field by field -- z, MLP outputs, embedding, final-norm scale and, for non-additive blocks,
the residual points -- within 1e-5 relative (float32) / 1e-12 (float64), or `engine_problem` says why
not and ``capture="auto"`` records hook capture with that reason. Where TransformerLens's own forward
fails on a family ("upstream": mixture-of-experts layers in float64), the engine must fail too.
`attribute` through the engine is checked against TransformerLens's cache for representative layouts.
Each family's largest error goes to the JSON file $EF_ENGINE_REPORT when set."""

from __future__ import annotations

import os
import warnings
from importlib import metadata

import pytest
import torch

import erasure_fast as ef
from conftest import TL_MAJOR, machine_facts, rel_err, upstream_fact, write_json

if TL_MAJOR < 4:
    pytest.skip("Hugging Face families are bridged by TransformerLens 4", allow_module_level=True)

from erasure_fast.capture import capture  # noqa: E402
from erasure_fast.engine import HFModulesEngine, engine_for, engine_problem  # noqa: E402
from hf_families import VOCAB, SavedFamilies, boot_bridge, registry_families  # noqa: E402
from tl_reference import check_against_cache  # noqa: E402

REGISTRY = registry_families()
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# One family per layout the engine must get right, checked end to end against TransformerLens's cache:
# GQA + RMSNorm + gated MLP; parallel blocks with partial rotary; post-norms with soft-capping; residual,
# embedding and attention multipliers; ALiBi; fused QKV (Conv1D); multi-query attention with an in-place
# add into the MLP output.
REPRESENTATIVE = ["LlamaForCausalLM", "GPTNeoXForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM",
                  "BloomForCausalLM", "GPT2LMHeadModel", "FalconForCausalLM"]
REPORT: dict = {}  # arch -> {dtype: {"engine": max rel err | None, "reason"/"status": ...}}
# Refused in float64 because they differ on some CPUs (an AMD EPYC, AVX2) while they agree to 3e-16 on
# others (an Intel Xeon, AVX-512): whether they differ here says nothing about their refusal.
F64_DIFFERS_BY_CPU = {"GPTNeoForCausalLM", "GPTJForCausalLM"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's saved tiny model, written on first use."""
    return SavedFamilies(tmp_path_factory.mktemp("engine_families"))


@pytest.fixture(scope="module", autouse=True)
def engine_report():
    yield REPORT
    path = os.environ.get("EF_ENGINE_REPORT")
    if path:
        write_json(path, dict(machine_facts(), families=REPORT))


def _tokens(batch=2, pos=11, seed=1):
    return torch.randint(2, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _record(arch, dtype, **entry):
    REPORT.setdefault(arch, {})[str(dtype).replace("torch.", "")] = entry


@pytest.mark.parametrize("arch", REGISTRY)
def test_engine_equals_hook_capture_or_says_why_not(arch, folders):
    for dtype in DTYPES.values():
        bridge = boot_bridge(folders[arch], dtype=dtype)
        try:
            spec = ef.model_spec(bridge)
        except ef.UnsupportedModelError as e:  # no attribution at all (tests/test_families.py)
            _record(arch, dtype, status="refused by model_spec", reason=str(e))
            return
        tokens = _tokens()
        problem = engine_problem(bridge, spec)
        if problem is not None:
            assert problem.startswith(arch) and "\n" not in problem, problem
            try:
                res = ef.attribute(bridge, tokens, writers=["L0H1"], backend="torch")
            except Exception as e:  # TransformerLens's own forward fails here (the family test's "upstream")
                _record(arch, dtype, status="hooks (upstream fails)", reason=problem, error=type(e).__name__)
                continue
            assert res.capture_description == f"hooks ({problem})"
            _record(arch, dtype, status="hooks", reason=problem)
            continue
        try:
            ref = capture(bridge, tokens, spec)
        except Exception as e:  # TransformerLens's own forward fails (e.g. MoE layers in float64): so must ours
            with pytest.raises(Exception):
                engine_for(bridge, spec).capture(spec, tokens)
            _record(arch, dtype, status="upstream", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:100]}")
            continue
        ran = []  # the engine runs copies of the modules: none of the bridge's own (bridged or not) may run
        handles = [m.register_forward_pre_hook(lambda *a: ran.append(1)) for m in bridge.modules()]
        try:
            got = engine_for(bridge, spec).capture(spec, tokens)
        finally:
            for handle in handles:
                handle.remove()
        assert not ran, f"{arch}: the engine ran {len(ran)} of the bridge's own modules"
        errors = {}
        for name in ("z", "mlp_out", "embed", "scale", "resid_points"):
            ours, theirs = getattr(got, name), getattr(ref, name)
            assert (ours is None) == (theirs is None), f"{arch} {name}: present in only one capture"
            if theirs is not None:
                assert ours.dtype == dtype and ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
                errors[name] = rel_err(ours, theirs)
        assert got.extra == ref.extra == {}
        worst = max(errors.values())
        _record(arch, dtype, status="engine", max_rel_err=worst, attention=engine_for(bridge, spec).attention,
                errors=errors)
        assert worst <= TOL[dtype], f"{arch} {dtype}: engine vs hook capture {errors}"


@pytest.mark.parametrize("arch", REPRESENTATIVE)
def test_attribute_through_the_engine_matches_transformer_lens(arch, folders):
    bridge = boot_bridge(folders[arch])
    tokens = _tokens(seed=3)
    assert ef.attribute(bridge, tokens, writers=["L0H1"]).capture == "engine"
    check_against_cache(bridge, tokens, writer=1, label=f"engine {arch}", dtype=torch.float32, backends=["torch"],
                        tol=1e-5)
    hooks = ef.attribute(bridge, tokens, writers="all", capture="hooks")
    engine = ef.attribute(bridge, tokens, writers="all", capture="engine")
    for field in ("dla", "pr", "resid_pr", "adjusted_dla"):
        assert rel_err(getattr(engine, field), getattr(hooks, field)) <= 1e-5, field


def test_the_engine_leaves_the_bridge_as_it_was(folders):
    """The engine runs a copy of the modules (same tensors): the bridge keeps its modules, hooks and
    attention implementation, and edits of the weights in place are seen by both."""
    bridge = boot_bridge(folders["LlamaForCausalLM"])
    spec = ef.model_spec(bridge)
    hf = bridge.original_model
    before = (hf.config._attn_implementation, [type(m).__name__ for m in hf.modules()])
    engine = engine_for(bridge, spec)
    assert isinstance(engine, HFModulesEngine) and engine.attention == "sdpa"
    tokens = _tokens(1, 7)
    first = engine.capture(spec, tokens)
    assert (hf.config._attn_implementation, [type(m).__name__ for m in hf.modules()]) == before
    assert not any("BridgeAttention" in type(m).__name__ or hasattr(m, "original_component")
                   for m in engine.model.modules())
    assert all(p is q for p, q in zip(engine.model.parameters(), hf.parameters()))
    assert len(list(engine.model.parameters())) == len(list(hf.parameters()))
    torch.testing.assert_close(first.z, capture(bridge, tokens, spec).z, rtol=1e-5, atol=1e-6)


def test_compatibility_mode_and_plain_transformers_models(folders):
    """A bridge in compatibility mode (processed weights) keeps hook capture, saying why; a plain
    transformers model and its bridge use the engine."""
    import transformers

    bridge = boot_bridge(folders["Qwen2ForCausalLM"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True)
    spec = ef.model_spec(bridge)
    problem = engine_problem(bridge, spec)
    assert problem is not None and "compatibility mode" in problem
    tokens = _tokens(1, 6)
    assert ef.attribute(bridge, tokens, writers=["L0H1"]).capture_description == f"hooks ({problem})"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["Qwen2ForCausalLM"]).eval()
    res = ef.attribute(hf, tokens, writers=["L0H1"])
    assert res.capture == "engine"
    hooks = ef.attribute(hf, tokens, writers=["L0H1"], capture="hooks")
    assert rel_err(res.adjusted_dla, hooks.adjusted_dla) <= 1e-5


def test_the_engines_refusal_lists_are_true(folders):
    """Each family the engine refuses in float64 with the transformers installed here does differ from
    hook capture there beyond 1e-12 (the engine made anyway; those whose difference depends on the CPU,
    F64_DIFFERS_BY_CPU, are only recorded), and each it no longer refuses equals it;
    TransformerLens's own forward does fail on each family refused for that; a model spread over several
    devices by a device_map is refused. The first two are upstream facts (`upstream_fact`): on releases
    other than the lock's, a change is reported as a refusal to lift or to restore."""
    from erasure_fast.engine import hf_modules

    tokens = _tokens()
    transformers_version = metadata.version("transformers")
    for arch in hf_modules._F64_ROUNDS_DIFFERENTLY:
        bridge = boot_bridge(folders[arch], dtype=torch.float64)
        spec = ef.model_spec(bridge)
        refused = hf_modules.rounds_differently_in_float64(arch)
        assert ("float64" in (engine_problem(bridge, spec) or "")) == refused
        got, ref = HFModulesEngine(bridge, spec).capture(spec, tokens), capture(bridge, tokens, spec)
        err = rel_err(got.z, ref.z)
        assert err < 1e-6
        REPORT.setdefault(arch, {}).setdefault("float64", {})["engine if made anyway"] = err
        if refused and arch in F64_DIFFERS_BY_CPU:
            continue  # equal on some CPUs, not on others (_F64_ROUNDS_DIFFERENTLY): refused everywhere
        if refused:
            upstream_fact(err > 1e-12, f"{arch}: the engine equals hook capture in float64 ({err:.1e}) on transformers "
                                       f"{transformers_version}: its float64 refusal can be lifted from this release "
                                       "(engine.hf_modules._F64_ROUNDS_DIFFERENTLY)")
        else:
            upstream_fact(err <= 1e-12, f"{arch}: the engine differs from hook capture in float64 ({err:.1e}) on "
                                        f"transformers {transformers_version}, where _F64_ROUNDS_DIFFERENTLY lifts its "
                                        "refusal: restore it for this release")
    for arch, reason in hf_modules._TRANSFORMER_LENS_FAILS.items():
        bridge = boot_bridge(folders[arch])
        try:
            bridge.run_with_cache(tokens)
            fails = False
        except Exception:  # the fact under test: TransformerLens's own forward fails on this family
            fails = True
        upstream_fact(fails, f"{arch}: TransformerLens {metadata.version('transformer-lens')} now runs its forward "
                             f"(refused for: {reason}): the refusal can be lifted (engine.hf_modules._TRANSFORMER_LENS_FAILS)")
    bridge = boot_bridge(folders["LlamaForCausalLM"])
    spec = ef.model_spec(bridge)
    bridge.original_model.hf_device_map = {"model.embed_tokens": 0, "model.layers": "cpu"}
    assert "device_map" in engine_problem(bridge, spec)
    bridge.original_model.hf_device_map = {"": "cpu"}
    assert engine_problem(bridge, spec) is None


def test_float64_refusals_are_keyed_by_the_transformers_release(monkeypatch):
    """A refusal holds on the releases before the one it is lifted from, on all of them when none is
    given, and a family not listed is never refused."""
    from erasure_fast.engine import hf_modules

    monkeypatch.setattr(hf_modules, "_F64_ROUNDS_DIFFERENTLY", {"A": None, "B": "5.25.0"})
    for version, b_refused in (("5.24.0", True), ("5.25.0", False), ("5.25.0rc1", True), ("6.0", False)):
        monkeypatch.setattr(hf_modules.metadata, "version", lambda name, v=version: v)
        assert hf_modules.rounds_differently_in_float64("A")
        assert hf_modules.rounds_differently_in_float64("B") == b_refused, version
        assert not hf_modules.rounds_differently_in_float64("C")
