"""Every decoder-only family TransformerLens 4 bridges (tests/hf_families.py: tiny random Hugging Face
models built offline) against TransformerLens's own cache, for the torch and cpp backends in fp32 and
fp64:

- DLA vs ``cache.logit_attrs(cache.stack_head_results(layer=-1, apply_ln=False), ...)`` for the next
  token, a fixed token and a logit difference;
- PR of every head and MLP onto a writer vs the paper's formula on the cached head results and
  ``hook_mlp_out``; residual-stream PR vs the cached ``hook_resid_pre/mid/post`` (no resid_mid for
  parallel attention + MLP blocks); adjusted DLA from its definition on those numbers.

Families cover the block layouts: parallel blocks (GPT-NeoX, GPT-J, Phi), grouped- and multi-query
attention (Llama, Mistral, Qwen, Gemma, GPTBigCode), bias-free projections, RMSNorm, rotary and ALiBi
positions, embedding scaling (Gemma), post-norms (Gemma 2/3, OLMo 2), a mixture-of-experts MLP (Mixtral).
Results are recorded per family (largest error per dtype) in $EF_FAMILY_REPORT when set (the largest
errors are also printed at the end of the run); the README's model table is generated from them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import erasure_fast as ef
from conftest import record_error, rel_err
from hf_families import FAMILIES, VOCAB, boot_bridge, save_family

BACKENDS = [b for b in ("torch", "cpp") if ef.available_backends()[b].available]
_RESULTS: dict = {}
# Families whose own forward pass cannot run in float64 here (checked below, so the list stays true).
FP64_UPSTREAM_UNSUPPORTED = {
    "MixtralForCausalLM": "transformers' mixture-of-experts layer calls torch's grouped matmul, which has no float64 kernel",
}
CASES = [(arch, dtype) for arch in FAMILIES for dtype in (torch.float32, torch.float64)
         if not (dtype == torch.float64 and arch in FP64_UPSTREAM_UNSUPPORTED)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: save_family(arch, str(root / arch)) for arch in FAMILIES}


def _reference(bridge, tokens, writer: int):
    _, cache = bridge.run_with_cache(tokens)
    L = bridge.cfg.n_layers
    stack = cache.stack_head_results(layer=-1, apply_ln=False)  # [n_heads_total, B, P, D]
    nodes = torch.cat([stack, torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])]).double()
    w = stack[writer].double()
    ww = (w * w).sum(-1)
    points = {"resid_pre0": "blocks.0.hook_resid_pre"}
    for l in range(L):
        points[f"resid_mid{l}"] = f"blocks.{l}.hook_resid_mid"
        points[f"resid_post{l}"] = f"blocks.{l}.hook_resid_post"
    return cache, stack, nodes, w, ww, points


@pytest.mark.parametrize("arch, dtype", CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in CASES])
def test_family_matches_transformer_lens(arch, dtype, folders):
    bridge = boot_bridge(folders[arch], dtype=dtype)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, VOCAB, (2, 11), generator=g)
    writer = 1  # L0H1
    cache, stack, nodes, w, ww, points = _reference(bridge, tokens, writer)
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    ref_next = cache.logit_attrs(stack, nxt)[:, :, :-1]
    ref_fixed = cache.logit_attrs(stack, 5)
    ref_diff = cache.logit_attrs(stack, 7, incorrect_tokens=3)
    pr_ref = (nodes * w).sum(-1) / ww
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    worst = 0.0
    for backend in BACKENDS:
        res = ef.attribute(bridge, tokens, writers=["L0H1"], backend=backend)
        label = f"family {arch}"
        checks = {
            "dla next": (res.dla.reshape(2, 11, -1).permute(2, 0, 1)[:, :, :-1], ref_next),
            "dla fixed": (ef.attribute(bridge, tokens, writers=["L0H1"], targets=5, backend=backend)
                          .dla.reshape(2, 11, -1).permute(2, 0, 1), ref_fixed),
            "dla logit diff": (ef.attribute(bridge, tokens, writers=["L0H1"], targets=7, incorrect=3, backend=backend)
                               .dla.reshape(2, 11, -1).permute(2, 0, 1), ref_diff),
            "pr": (res.pr[..., 0].permute(2, 0, 1), pr_ref),
        }
        rp = torch.stack([cache[points[k]] for k in res.resid_labels]).double()
        checks["resid pr"] = (res.resid_pr[..., 0].permute(2, 0, 1), (rp * w).sum(-1) / ww)
        down = res.downstream[:, 0].cpu()
        ref_adjusted = ref_next[writer] * (1 + (pr_ref[down][:, :, :-1]).sum(0))
        checks["adjusted dla"] = (res.adjusted_dla[:, :-1, 0], ref_adjusted)
        for name, (ours, ref) in checks.items():
            e = rel_err(ours, ref)
            record_error(f"{label}: {name}", dtype, backend, e)
            worst = max(worst, e)
            assert e <= tol, f"{arch} {backend} {name}: rel err {e:.2e} > {tol:.0e}"
    spec = ef.model_spec(bridge)
    expected = ["resid_pre0"] + [f"resid_{k}{l}" for l in range(2) for k in (("post",) if spec.parallel_blocks else ("mid", "post"))]
    assert res.resid_labels == expected
    if spec.parallel_blocks:  # MLP0 reads the stream before layer 0's heads write: not downstream of L0H1
        assert not bool(res.downstream[res.node_labels.index("MLP0"), 0])
    kv = getattr(bridge.cfg, "n_key_value_heads", None) or spec.n_heads
    facts = dict(blocks="parallel" if spec.parallel_blocks else ("post-norm" if not spec.additive_blocks else "sequential"),
                 attention="MHA" if kv == spec.n_heads else ("MQA" if kv == 1 else "GQA"),
                 positions=str(getattr(bridge.cfg, "positional_embedding_type", "?")), normalization=spec.normalization)
    _RESULTS.setdefault(arch, {"facts": facts})[str(dtype).replace("torch.", "")] = dict(
        status="pass", max_rel_err=worst, backends=BACKENDS)


@pytest.mark.parametrize("arch", list(FP64_UPSTREAM_UNSUPPORTED))
def test_fp64_exclusions_are_upstream_limits(arch, folders):
    """The model's own TransformerLens forward fails in float64 (so the exclusion is not ours to lift)."""
    bridge = boot_bridge(folders[arch], dtype=torch.float64)
    with pytest.raises(RuntimeError):
        bridge(torch.randint(2, VOCAB, (1, 5)))
    _RESULTS.setdefault(arch, {})["float64"] = dict(status="upstream limit", reason=FP64_UPSTREAM_UNSUPPORTED[arch])


README_BEGIN = "<!-- families table: generated by tests/test_families.py -->"
README_END = "<!-- end of families table -->"


def family_table(results: dict) -> str:
    """The README's model table from this test's results."""
    lines = ["| HF class | blocks | attention | positions | final norm | `attribute` fp32 | fp64 |",
             "|---|---|---|---|---|---|---|"]
    for arch in FAMILIES:
        r = results.get(arch, {})
        f = r.get("facts", {})
        cell = {d: ("pass" if r.get(d, {}).get("status") == "pass" else r.get(d, {}).get("status", "not run"))
                for d in ("float32", "float64")}
        lines.append(f"| {arch} | {f.get('blocks', '?')} | {f.get('attention', '?')} | {f.get('positions', '?')} | "
                     f"{f.get('normalization', '?')} | {cell['float32']} | {cell['float64']} |")
    return "\n".join(lines)


def test_write_family_report_and_readme_table_is_current():
    """The README's model table is this test's result (and the JSON in $EF_FAMILY_REPORT, when set)."""
    assert set(_RESULTS) == set(FAMILIES), "the table needs every family's test in this run"
    path = os.environ.get("EF_FAMILY_REPORT")
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(_RESULTS, f, indent=1, sort_keys=True)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert table == family_table(_RESULTS), "README model table is stale:\n" + family_table(_RESULTS)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_scan_runs_on_every_family_with_a_text_corpus(arch, folders, tmp_path):
    """A .jsonl text corpus tokenised with the model's saved tokenizer, scanned on the default backend;
    the scan's aggregates agree with a direct attribution of the same rows."""
    import numpy as np

    from transformers import PreTrainedTokenizerFast

    bridge = boot_bridge(folders[arch])
    # the saved word-level tokenizer (TransformerLens reloads a family's tokenizer through AutoTokenizer,
    # which for some families, e.g. Qwen2, substitutes their own class that ignores this vocabulary)
    tok = PreTrainedTokenizerFast.from_pretrained(folders[arch])
    docs = [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(40)) for i in range(4)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    res = ef.scan(bridge, str(tmp_path / "c.jsonl"), seq_len=16, batch_size=4, writers=["L0H1", "L1H2"],
                  out_dir=str(tmp_path / "out"), progress=False, tokenizer=tok)
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
