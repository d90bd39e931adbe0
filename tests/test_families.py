"""Coverage by construction: every decoder-only text family of TransformerLens 4's architecture-adapter
registry whose model class the installed transformers has (tests/hf_families.py: tiny random Hugging
Face models built offline) either matches TransformerLens's own cache or is refused before any work
with an error naming the family and why. Checked for the torch and cpp backends in fp32 and fp64:

- DLA vs ``cache.logit_attrs(cache.stack_head_results(layer=-1, apply_ln=False), ...)`` for the next
  token, a fixed token and a logit difference;
- PR of every head and MLP onto a writer vs the paper's formula on the cached head results and
  ``hook_mlp_out``; residual-stream PR vs the cached ``hook_resid_pre/mid/post`` (no resid_mid for
  parallel attention + MLP blocks); adjusted DLA from its definition on those numbers;
- the same numbers, bit for bit, through the plain ``transformers`` model and an nnsight
  ``LanguageModel`` around it (fp32);
- a ``.jsonl`` scan with the model's tokenizer on the default backend.

Outcomes per family: "pass"; "refused" (`erasure_fast.UnsupportedModelError` from `model_spec`, no
forward pass run); "upstream" (TransformerLens's own ``run_with_cache`` fails on the family; erasure_fast
must then fail too, never return numbers). The families the issue names must pass. Results go to
tests/family_results.py, from which tests/test_families_table.py makes the model table of docs/families.md.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import erasure_fast as ef
from conftest import run_cli
from family_results import RESULTS
from hf_families import FAMILIES, VOCAB, SavedFamilies, boot_bridge, registry_families
from tl_reference import check_against_cache, forward_calls, logit_attrs

BACKENDS = [b for b in ("torch", "cpp") if ef.available_backends()[b].available]
REGISTRY = registry_families()
MUST_PASS = set(FAMILIES)  # the families the architecture issue names
# Named families whose compatibility mode TransformerLens itself cannot enter (checked: the test fails
# when it can).
COMPAT_UPSTREAM = {"PhiForCausalLM"}
CASES = [(arch, dtype) for arch in REGISTRY for dtype in (torch.float32, torch.float64)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's saved tiny model, written on first use."""
    return SavedFamilies(tmp_path_factory.mktemp("families"))


def _record(arch, dtype, **entry):
    RESULTS.setdefault(arch, {})[str(dtype).replace("torch.", "")] = entry


def _facts(bridge, spec) -> dict:
    kv = getattr(bridge.cfg, "n_key_value_heads", None) or spec.n_heads
    post_norms = any(hasattr(block, name) for block in bridge.blocks for name in ("ln1_post", "ln2_post"))
    blocks = "parallel" if spec.parallel_blocks else ("post-norm" if post_norms else "sequential")
    if spec.extra_writers:
        blocks += " + " + "/".join(spec.extra_writers)
    return dict(blocks=blocks, attention="MHA" if kv == spec.n_heads else ("MQA" if kv == 1 else "GQA"),
                positions=str(getattr(bridge.cfg, "positional_embedding_type", "?")), normalization=spec.normalization)


@pytest.mark.parametrize("arch, dtype", CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in CASES])
def test_family_matches_transformer_lens_or_is_refused(arch, dtype, folders):
    bridge = boot_bridge(folders[arch], dtype=dtype)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, VOCAB, (2, 11), generator=g)
    calls = forward_calls(bridge)
    try:
        spec = ef.model_spec(bridge)
    except ef.UnsupportedModelError as e:
        assert arch not in MUST_PASS, f"{arch} must be supported: {e}"
        assert str(e).startswith(arch), f"the refusal must name the family: {e}"
        with pytest.raises(ef.UnsupportedModelError):
            ef.attribute(bridge, tokens, writers=["L0H1"])
        assert not calls, "refused after running the model"
        _record(arch, dtype, status="refused", reason=str(e))
        return
    try:  # TransformerLens's own path on this family
        _, cache = bridge.run_with_cache(tokens)
        logit_attrs(bridge, cache, cache.stack_head_results(layer=-1, apply_ln=False), 5)
    except Exception as e:  # TransformerLens's own path fails on this family: ours must not return numbers
        # (a named family may only hit this in float64: e.g. mixture-of-experts layers call torch's
        # grouped matmul, which has no float64 kernel)
        assert arch not in MUST_PASS or dtype == torch.float64, f"TransformerLens fails on {arch}: {e!r}"
        with pytest.raises(Exception) as ours:
            ef.attribute(bridge, tokens, writers=["L0H1"], backend="torch")
        _record(arch, dtype, status="upstream", reason=f"TransformerLens's run_with_cache fails: {type(e).__name__}: "
                f"{' '.join(str(e).split())[:120]}", ours=type(ours.value).__name__)
        return
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    worst = check_against_cache(bridge, tokens, writer=1, label=f"family {arch}", dtype=dtype, backends=BACKENDS, tol=tol)
    RESULTS.setdefault(arch, {})["facts"] = _facts(bridge, spec)
    _record(arch, dtype, status="pass", max_rel_err=worst, backends=BACKENDS)


def _status(arch) -> str:
    return RESULTS.get(arch, {}).get("float32", {}).get("status", "not run")


@pytest.mark.parametrize("arch", REGISTRY)
def test_compatibility_mode_bridge_matches_transformer_lens(arch, folders):
    """The same checks on the bridge in compatibility mode (folded norms, centred weights: the
    HookedTransformer numerics); fp32."""
    if _status(arch) != "pass":
        RESULTS.setdefault(arch, {})["compat"] = _status(arch)
        return
    bridge = boot_bridge(folders[arch])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge.enable_compatibility_mode(disable_warnings=True)
    except Exception as e:  # TransformerLens's own weight processing fails on this family
        assert arch not in MUST_PASS or arch in COMPAT_UPSTREAM, f"compatibility mode fails on {arch}: {e!r}"
        RESULTS.setdefault(arch, {}).update(compat="upstream", compat_reason=f"{type(e).__name__}: {str(e)[:200]}")
        return
    tokens = torch.randint(2, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    check_against_cache(bridge, tokens, writer=1, label=f"family {arch} (compat)", dtype=torch.float32,
                        backends=BACKENDS, tol=1e-5)
    RESULTS.setdefault(arch, {})["compat"] = "pass"


@pytest.mark.parametrize("arch", REGISTRY)
def test_plain_transformers_and_nnsight_give_the_bridges_numbers(arch, folders):
    """`attribute(hf_model, tokens)` and `attribute(nnsight.LanguageModel(hf_model), tokens)` (and
    nnsight's `TransformersModel`): the numbers of the bridge built from the same folder, bit for bit; the model's attention
    implementation is left as it was; a refused family is refused through every interface."""
    import transformers
    from nnsight import LanguageModel, TransformersModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folders[arch]).eval()
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(folders[arch])
        lm = LanguageModel(hf, tokenizer=tok)
        tm = TransformersModel(hf, tokenizer=tok)
    attn_impl = hf.config._attn_implementation
    tokens = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    status = _status(arch)
    if status != "pass":
        for model in (hf, lm, tm):
            with pytest.raises(Exception) as refused:
                ef.attribute(model, tokens, writers=["L0H1"])
            if status == "refused":
                assert isinstance(refused.value, ef.UnsupportedModelError) and str(refused.value).startswith(arch)
        RESULTS.setdefault(arch, {})["interfaces"] = "refused by all" if status == "refused" else "fail as TransformerLens"
        return
    ref = ef.attribute(boot_bridge(folders[arch]), tokens, writers=["L0H1"])
    for name, model in (("transformers", hf), ("nnsight", lm), ("nnsight", tm)):
        got = ef.attribute(model, tokens, writers=["L0H1"])
        for field in ("dla", "pr", "resid_pr", "adjusted_dla"):
            a, b = getattr(got, field), getattr(ref, field)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name} {field}"
        assert ef.models.interface_name(model) == name
    assert hf.config._attn_implementation == attn_impl, "the user's model was left in another attention mode"
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in hf.modules()), "the model was rewired"
    assert ef.as_transformer_lens(hf) is ef.as_transformer_lens(lm) is ef.as_transformer_lens(tm), "one bridge per model"
    RESULTS.setdefault(arch, {})["interfaces"] = "bridge, transformers, nnsight"


def test_compat_upstream_list_is_true(folders):
    """Each family in COMPAT_UPSTREAM still fails TransformerLens's own enable_compatibility_mode."""
    for arch in COMPAT_UPSTREAM:
        with pytest.raises(Exception):
            boot_bridge(folders[arch]).enable_compatibility_mode(disable_warnings=True)


@pytest.mark.parametrize("arch", REGISTRY)
def test_scan_runs_on_every_supported_family_with_a_text_corpus(arch, folders, tmp_path):
    """A .jsonl text corpus tokenised with the model's saved tokenizer, scanned on the default backend;
    the scan's aggregates agree with a direct attribution of the same rows. Refused families are refused
    before the output folder is written."""
    from transformers import PreTrainedTokenizerFast

    bridge = boot_bridge(folders[arch])
    # the saved word-level tokenizer (TransformerLens reloads a family's tokenizer through AutoTokenizer,
    # which for some families, e.g. Qwen2, substitutes their own class that ignores this vocabulary)
    tok = PreTrainedTokenizerFast.from_pretrained(folders[arch])
    docs = [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(40)) for i in range(4)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    kwargs = dict(seq_len=16, batch_size=4, writers=["L0H1", "L1H2"], out_dir=str(tmp_path / "out"), progress=False,
                  tokenizer=tok)
    status = _status(arch)
    if status != "pass":
        with pytest.raises(Exception) as refused:
            ef.scan(bridge, str(tmp_path / "c.jsonl"), **kwargs)
        if status == "refused":
            assert isinstance(refused.value, ef.UnsupportedModelError)
            assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        RESULTS.setdefault(arch, {})["scan"] = status
        return
    res = ef.scan(bridge, str(tmp_path / "c.jsonl"), **kwargs)
    spec = ef.model_spec(bridge)
    assert res.meta["backend"] == "cpp" and res.meta["tokens"] == res.meta["rows"] * 16 >= 16 * 8
    rows = [r for _, r in ef.scanning.open_corpus(str(tmp_path / "c.jsonl"), seq_len=16, tokenizer=tok).rows()]
    direct = ef.attribute(bridge, torch.from_numpy(np.stack(rows)), writers=["L0H1", "L1H2"], backend="torch")
    s = res.summary
    row = s[(s.kind == "node") & (s.node == "MLP1") & (s.writer == "L0H1")].iloc[0]
    v = direct.pr[:, :, direct.node_labels.index("MLP1"), 0].double().reshape(-1).numpy()
    assert row["mean"] == pytest.approx(float(np.nanmean(v)), rel=1e-4, abs=1e-6)
    resid = set(s[s.kind == "resid"].node)
    assert resid == set(spec.resid_labels()) and (("resid_mid0" in resid) != spec.parallel_blocks)
    assert (tmp_path / "out" / "report.md").exists()
    RESULTS.setdefault(arch, {})["scan"] = "pass"


def test_cli_scans_a_hugging_face_checkpoint_folder_with_its_tokenizer(folders, tmp_path):
    """`erasure-fast scan --model <HF folder> --corpus <.txt>`: the checkpoint is bridged by TransformerLens 4
    and the text read with the folder's own tokenizer (as TransformerLens configures it); the summary
    equals the Python API's scan of `load_model(folder)`. A second run into the same folder finds the
    scan done."""
    import pandas as pd

    folder = folders["LlamaForCausalLM"]
    text = " ".join(f"w{(5 * j) % 90}" for j in range(400))
    (tmp_path / "c.txt").write_text(text)
    args = ("scan", "--model", folder, "--corpus", tmp_path / "c.txt", "--seq-len", 16, "--batch-size", 4,
            "--writers", "L0H1", "--out", tmp_path / "out", "--no-progress")
    done = run_cli(*args, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = pd.read_csv(tmp_path / "out" / "summary.csv")
    model = ef.load_model(folder)
    assert model.tokenizer is not None and ef.models.interface_name(model) == "bridge"
    ref = ef.scan(model, str(tmp_path / "c.txt"), seq_len=16, batch_size=4, writers=["L0H1"],
                  out_dir=str(tmp_path / "ref"), progress=False).summary
    assert len(ours) == len(ref) and ours["median"].to_numpy() == pytest.approx(ref["median"].to_numpy(), nan_ok=True)
    again = run_cli(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "resuming" in again.stderr and "after 400 tokens" in again.stderr


def test_cli_refuses_an_unsupported_family_in_one_line(folders, tmp_path):
    """A Mamba checkpoint: one line naming the family and why, exit 2, before the output folder is made."""
    np.save(tmp_path / "t.npy", np.arange(64, dtype=np.int64).reshape(4, 16) % VOCAB)
    done = run_cli("scan", "--model", folders["MambaForCausalLM"], "--corpus", tmp_path / "t.npy", "--out", tmp_path / "out",
                   cwd=tmp_path, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "MambaForCausalLM" in lines[0] and "no attention heads" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_plain_transformers_model_is_followed_through_weight_edits_and_left_untouched(folders):
    """The bridge of a transformers model shares its weight tensors: an in-place edit is seen on the next
    call, a replaced parameter makes a new bridge, and the model itself keeps its modules and hooks."""
    import gc
    import weakref

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["LlamaForCausalLM"]).eval()
    fired = []
    handle = hf.model.layers[0].register_forward_hook(lambda *a: fired.append(1))
    tokens = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    # the bridged copy would not run the user's hook: refused, naming it, rather than analysing another model
    with pytest.raises(ValueError, match=r"model: this transformers model has hooks attached \(forward hook <lambda> on "
                                         r"model.layers.0\)"):
        ef.attribute(hf, tokens, writers=["L0H1"])
    assert not fired and len(hf.model.layers[0]._forward_hooks) == 1  # left as it was
    handle.remove()
    before = ef.attribute(hf, tokens, writers=["L0H1"]).dla
    o_proj = hf.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight.mul_(2.0)  # in place: layer 1's heads write twice as much
    after = ef.attribute(hf, tokens, writers=["L0H1"]).dla
    fresh = transformers.AutoModelForCausalLM.from_pretrained(folders["LlamaForCausalLM"]).eval()
    with torch.no_grad():
        fresh.model.layers[1].self_attn.o_proj.weight.mul_(2.0)
    torch.testing.assert_close(after, ef.attribute(fresh, tokens, writers=["L0H1"]).dla, equal_nan=True, rtol=0, atol=0)
    assert not torch.allclose(after.nan_to_num(), before.nan_to_num())
    bridge = ef.as_transformer_lens(hf)
    o_proj.weight = torch.nn.Parameter(o_proj.weight.detach() / 2)  # replaced: a new bridge
    assert ef.as_transformer_lens(hf) is not bridge
    torch.testing.assert_close(ef.attribute(hf, tokens, writers=["L0H1"]).dla, before, equal_nan=True)
    assert type(hf.model.layers[0]).__name__ == "LlamaDecoderLayer"
    ref = weakref.ref(ef.as_transformer_lens(hf))
    del hf, bridge, o_proj, fresh
    gc.collect()
    assert ref() is None, "the bridge outlived its model"
