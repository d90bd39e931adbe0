"""Each of the paper's analyses (`erasure_fast.paper`, default ``method="paper"``) against an
independent implementation of what the authors' code computes (GitHub canrager/cleanup_nodes,
figure_recreation/fig1..fig8), written here from reading that code:

- the model as their ``HookedTransformer.from_pretrained("gelu-4l")`` loads it: TransformerLens's own
  ``load_and_process_state_dict`` with from_pretrained's defaults (fold_ln, center_writing_weights,
  center_unembed, fold_value_biases), ``use_attn_result`` and, where they set it,
  ``use_split_qkv_input`` -- so this module needs TransformerLens 3's HookedTransformer;
- their hooks and formulas: PR = a . w / |w|^2 of cached ``hook_resid_*`` / ``hook_result`` /
  ``hook_mlp_out`` (figs 1, 2); the writer's ``hook_result`` subtracted from ``blocks.2.hook_v_input``
  with ``blocks.2.ln1.hook_scale`` frozen (fig 3); the head's ``ln1.hook_normalized`` replaced at the
  last position by a donor's, donors the first P tokens of corpus rows, clean final scale (fig 4);
  c(r_w) / s_ln1 through sum_e W_V W_O at positions 32..P-2 and a least-squares line (fig 5); both
  parts of the writer from its cached pattern and values, PRs of the layer-2 heads summed per token
  with NaN skipped, the last position dropped (fig 8);
- their statistics: pandas medians and seaborn's ``errorbar=("pi", 75)`` (numpy's nanpercentile at
  12.5 / 87.5 %).

The package runs on the same raw weights loaded with its own processing
(`erasure_fast.tl_models.from_pretrained_processing`). Models: the planted demo circuit (small widths)
and a random model whose norms and biases are random too (so that folding and centring matter).
Targets: per-token values within 1e-5 (relative above 1), medians and fit parameters within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TL_MAJOR, record_error
from erasure_fast import paper
from erasure_fast.demo import PLANTED, demo_corpus, model_from_state_dict, planted_weights, random_tl_state_dict
from erasure_fast.paper.bos_split import bos_split_values
from erasure_fast.paper.causal import causal_runs
from erasure_fast.paper.common import DEFAULT_ERASERS, attribute_with_hooks
from erasure_fast.paper.resample import resampled_dla
from erasure_fast.tl_models import from_pretrained_processing

pytestmark = pytest.mark.skipif(TL_MAJOR != 3, reason="the authors' reference needs TransformerLens 3's HookedTransformer "
                                                     "(use_split_qkv_input); `make test-tl3` runs it")

# d_mlp != d_model: TransformerLens 3.9's processing folds ln2 into a square W_in along the wrong axis
DIMS = dict(n_layers=4, n_heads=8, d_head=32, d_model=256, d_mlp=512, d_vocab=300, n_ctx=128)
CFG = dict(DIMS, act_fn="gelu", normalization_type="LN", attn_only=False)
ROWS, SEQ = 6, 64  # an even number of rows and of tokens: medians are means of two middle values
TOKEN_TOL, STAT_TOL = 1e-5, 1e-4
RESID_POINTS = ["resid_pre0"] + [f"resid_{k}{l}" for l in range(DIMS["n_layers"]) for k in ("mid", "post")]


def _random_weights() -> dict:
    sd = random_tl_state_dict(DIMS, seed=7)
    g = torch.Generator().manual_seed(8)
    for key, value in sd.items():
        if value.ndim <= 2 and (".ln" in key or key.startswith("ln") or ".b_" in key):  # norms and biases
            sd[key] = value + 0.3 * torch.randn(value.shape, generator=g)
    return sd


MODELS = {  # name -> (raw weights, writer, erasers)
    "planted": lambda: (planted_weights(0, DIMS)[0], PLANTED["writer"], list(PLANTED["erasers"])),
    "random": lambda: (_random_weights(), "L0H2", list(DEFAULT_ERASERS)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """(name, package model, authors' model, writer, erasers, tokens [ROWS, SEQ] with BOS at 0)."""
    return _build(request.param)


def _build(name: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    sd, writer, erasers = MODELS[name]()
    ours = model_from_state_dict(DIMS, sd, processing="from_pretrained")
    cfg = HookedTransformerConfig(**DIMS, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard")
    theirs = HookedTransformer(cfg)
    theirs.load_and_process_state_dict({k: v.clone() for k, v in sd.items()}, fold_ln=True, center_writing_weights=True,
                                       center_unembed=True, fold_value_biases=True)
    theirs.cfg.use_attn_result = True
    theirs.eval()
    tokens = torch.from_numpy(demo_corpus(ROWS, SEQ, DIMS["d_vocab"], seed=21)).long()
    tokens[:, 0] = PLANTED["bos"]
    return name, ours, theirs, writer, erasers, tokens


def _head(label: str):
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def _pr(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a . w / |w|^2 over the last axis, in float64 (NaN where w is zero, as the authors' division gives)."""
    a, w = a.double(), w.double()
    return (a * w).sum(-1) / (w * w).sum(-1)


def _stats(values) -> np.ndarray:
    """pandas' median and seaborn's 75 % percentile interval of ``values``, NaN skipped."""
    x = pd.Series(np.asarray(values, dtype=np.float64).reshape(-1))
    return np.array([x.median(), *np.nanpercentile(x.to_numpy(), [12.5, 87.5])])


def _err(ours, ref) -> float:
    """Largest |ours - ref| / max(1, |ref|) (absolute for values up to 1, relative above); NaN where the
    other is NaN too."""
    ours, ref = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64) for x in (ours, ref))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.array_equal(np.isnan(ours), np.isnan(ref)), "NaN patterns differ"
    ok = ~np.isnan(ref)
    return float(np.max(np.abs(ours[ok] - ref[ok]) / np.maximum(1.0, np.abs(ref[ok])), initial=0.0))


def _check(label: str, name: str, ours, ref, tol: float) -> float:
    e = _err(ours, ref)
    record_error(f"paper reference {name} {label}", torch.float32, "auto", e)
    assert e <= tol, f"{name} {label}: {e:.2e} > {tol:.0e}"
    return e


def _cache(model, tokens, names):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return cache


def test_processing_is_transformer_lens_from_pretrained(case):
    """The package's processing gives the weights TransformerLens's does (float32 rounding apart)."""
    name, ours, theirs, *_ = case
    sd = MODELS[name]()[0]
    mine = from_pretrained_processing(CFG, {k: v.double() for k, v in sd.items()})
    reference = theirs.state_dict()
    compared = 0
    for key, value in reference.items():
        if key in mine:
            scale = max(float(value.abs().max()), 1e-30)
            assert float((mine[key] - value.double()).abs().max()) <= 1e-6 * scale, key
            compared += 1
    assert compared == 12 * DIMS["n_layers"] + 4  # every block's 12 weights and biases, W_E, W_pos, W_U, b_U
    for key in mine:  # the folded norms stay as weight 1, bias 0 (LNPre's computation)
        if key not in reference:
            assert ".ln" in key or key.startswith("ln_final"), key
            assert torch.equal(mine[key], torch.ones_like(mine[key]) if key.endswith(".w") else torch.zeros_like(mine[key]))


def test_fig1_fig2_match_the_authors(case):
    name, ours, theirs, writer, _, tokens = case
    wl, wh = _head(writer)
    L, H = DIMS["n_layers"], DIMS["n_heads"]
    hooks = {"resid_pre0": "blocks.0.hook_resid_pre"}
    hooks.update({f"resid_{k}{l}": f"blocks.{l}.hook_resid_{k}" for l in range(L) for k in ("mid", "post")})
    cache = _cache(theirs, tokens, set(hooks.values()) | {f"blocks.{l}.attn.hook_result" for l in range(L)}
                   | {f"blocks.{l}.hook_mlp_out" for l in range(L)})
    w = cache[f"blocks.{wl}.attn.hook_result"][:, :, wh]
    ref_resid = {p: _pr(cache[h], w) for p, h in hooks.items()}
    ref_nodes = {f"L{l}H{h}": _pr(cache[f"blocks.{l}.attn.hook_result"][:, :, h], w) for l in range(L) for h in range(H)}
    ref_nodes.update({f"MLP{l}": _pr(cache[f"blocks.{l}.hook_mlp_out"], w) for l in range(L)})
    res = attribute_with_hooks(ours, tokens, [writer])  # what fig1_fig2 computes its tables from
    assert res.resid_labels == RESID_POINTS
    for i, p in enumerate(res.resid_labels):
        _check("fig1 per token", name, res.resid_pr[:, :, i, 0], ref_resid[p], TOKEN_TOL)
    for i, n in enumerate(res.node_labels):
        if n in ref_nodes:
            _check("fig2 per token", name, res.pr[:, :, i, 0], ref_nodes[n], TOKEN_TOL)
    resid, nodes = paper.fig1_fig2(tokens, writer, model=ours)
    _check("fig1 median, band", name, resid[["median", "q0.125", "q0.875"]].to_numpy(),
           np.stack([_stats(ref_resid[p]) for p in resid.node]), STAT_TOL)
    heads_mlps = nodes[nodes.node.isin(list(ref_nodes))]
    assert len(heads_mlps) == L * (H + 1)
    _check("fig2 median, band", name, heads_mlps[["median", "q0.125", "q0.875"]].to_numpy(),
           np.stack([_stats(ref_nodes[n]) for n in heads_mlps.node]), STAT_TOL)


def test_fig3_matches_the_authors(case):
    name, ours, theirs, writer, erasers, tokens = case
    wl, wh = _head(writer)
    layer = _head(erasers[0])[0]
    L, H = DIMS["n_layers"], DIMS["n_heads"]
    hooks = {"resid_pre0": "blocks.0.hook_resid_pre"}
    hooks.update({f"resid_{k}{l}": f"blocks.{l}.hook_resid_{k}" for l in range(L) for k in ("mid", "post")})
    wanted = set(hooks.values()) | {f"blocks.{wl}.attn.hook_result", f"blocks.{layer}.attn.hook_result",
                                    f"blocks.{layer}.ln1.hook_scale"}
    theirs.cfg.use_split_qkv_input = True  # hook_v_input: the value input of each head of the layer
    try:
        clean = _cache(theirs, tokens, wanted)
        w = clean[f"blocks.{wl}.attn.hook_result"][:, :, wh]
        frozen = clean[f"blocks.{layer}.ln1.hook_scale"]
        patched = {}

        def keep(t, hook):
            patched[hook.name] = t.detach().clone()

        with torch.no_grad():
            theirs.run_with_hooks(tokens, fwd_hooks=[
                (f"blocks.{layer}.hook_v_input", lambda v, hook: v - w[:, :, None]),  # every head's value input
                (f"blocks.{layer}.ln1.hook_scale", lambda s, hook: frozen),  # its norm's scale as in the clean run
            ] + [(h, keep) for h in wanted - {f"blocks.{layer}.ln1.hook_scale"}])
    finally:
        theirs.cfg.use_split_qkv_input = False
    runs = {"clean": clean, "patched": patched}
    ref = {(run, f"L{layer}H{h}"): _pr(c[f"blocks.{layer}.attn.hook_result"][:, :, h], w) for run, c in runs.items()
           for h in range(H)}
    ref.update({(run, p): _pr(c[hk], w) for run, c in runs.items() for p, hk in hooks.items()})
    res = dict(zip(("clean", "patched"), causal_runs(ours, tokens, writer, erasers)))
    spec_labels = res["clean"].node_labels
    for run in runs:
        for h in range(H):
            i = spec_labels.index(f"L{layer}H{h}")
            _check("fig3 head per token", name, res[run].pr[:, :, i, 0], ref[(run, f"L{layer}H{h}")], TOKEN_TOL)
        for i, p in enumerate(res[run].resid_labels):
            _check("fig3 resid per token", name, res[run].resid_pr[:, :, i, 0], ref[(run, p)], TOKEN_TOL)
    table = paper.causal_check(ours, tokens, writer, erasers)
    assert list(table.node) == [f"L{layer}H{h}" for h in range(H)] + RESID_POINTS
    for run in runs:
        _check("fig3 median, band", name, table[[f"{run}_median", f"{run}_q0.125", f"{run}_q0.875"]].to_numpy(),
               np.stack([_stats(ref[(run, n)]) for n in table.node]), STAT_TOL)


def _authors_fig4(model, prompt, correct: int, incorrect: int, head: str, donors: torch.Tensor):
    """(clean DLA, resampled DLA per donor) at the last position of one prompt [1, P]."""
    layer, h = _head(head)
    direction = (model.W_U[:, correct] - model.W_U[:, incorrect]).detach().double()
    model.cfg.use_split_qkv_input = True  # hook_normalized gets a head axis
    try:
        clean = _cache(model, prompt, {f"blocks.{layer}.attn.hook_result", "ln_final.hook_scale"})
        scale = clean["ln_final.hook_scale"][0, -1].double()

        def dla(r):
            r = r.double()
            return ((r - r.mean(-1, keepdim=True)) / scale) @ direction

        normalized = f"blocks.{layer}.ln1.hook_normalized"
        donor = _cache(model, donors[:, :prompt.shape[1]], {normalized})[normalized]
        n = donors.shape[0]

        def resample_last(x, hook):  # q, k and v inputs of the head alike, at the last position only
            x = x.clone()
            x[:, -1, h] = donor[:, -1, h]
            return x

        out = {}

        def keep(t, hook):
            out["r"] = t[:, -1, h].clone()

        with torch.no_grad():
            model.run_with_hooks(prompt.expand(n, -1), fwd_hooks=[(normalized, resample_last),
                                                                  (f"blocks.{layer}.attn.hook_result", keep)])
    finally:
        model.cfg.use_split_qkv_input = False
    return dla(clean[f"blocks.{layer}.attn.hook_result"][0, -1, h]), dla(out["r"])


def test_fig4_matches_the_authors(case):
    name, ours, theirs, writer, _, tokens = case
    prompts = torch.from_numpy(demo_corpus(2, 16, DIMS["d_vocab"], seed=31)).long()
    prompts[:, 0] = PLANTED["bos"]
    corpus = demo_corpus(8, 40, DIMS["d_vocab"], seed=32)
    corpus[:, 0] = PLANTED["bos"]
    correct, incorrect = [11, 12], [13, 14]
    for head in (writer, "L1H4", "L2H1"):  # the writer, and heads that attend by content
        clean, samples = resampled_dla(ours, prompts, correct, incorrect, head, corpus)
        table = paper.resample_ablation(ours, prompts, correct, incorrect, head, corpus)
        for b in range(len(prompts)):
            ref_clean, ref = _authors_fig4(theirs, prompts[b:b + 1], correct[b], incorrect[b], head,
                                           torch.from_numpy(corpus).long())
            _check("fig4 clean DLA", name, clean[b], ref_clean, TOKEN_TOL)
            _check("fig4 resampled DLA per donor", name, samples[b], ref, TOKEN_TOL)
            _check("fig4 median, band", name, table.loc[b, ["resampled_median", "resampled_q0.125", "resampled_q0.875"]]
                   .to_numpy(float), _stats(ref), STAT_TOL)


def test_fig5_matches_the_authors(case):
    name, ours, theirs, writer, erasers, tokens = case
    wl, wh = _head(writer)
    layer = _head(erasers[0])[0]
    start = 32
    cache = _cache(theirs, tokens, {f"blocks.{wl}.attn.hook_result", f"blocks.{layer}.ln1.hook_scale", "ln_final.hook_scale"})
    r_w = cache[f"blocks.{wl}.attn.hook_result"][:, :, wh].double()
    x = (r_w - r_w.mean(-1, keepdim=True)) / cache[f"blocks.{layer}.ln1.hook_scale"].double()
    heads = [_head(e)[1] for e in erasers]
    ov = sum(theirs.W_V[layer, h].double() @ theirs.W_O[layer, h].double() for h in heads)  # attention ignored
    s = cache["ln_final.hook_scale"].double()
    W_U = theirs.W_U.double()
    nxt = tokens[:, start + 1:]

    def dla(v):
        v = ((v - v.mean(-1, keepdim=True)) / s)[:, start:-1]
        return (v * W_U.T[nxt]).sum(-1).reshape(-1)

    ref_x, ref_y = dla(r_w).detach().numpy(), dla(x @ ov).detach().numpy()
    (slope, intercept), cov = np.polyfit(ref_x, ref_y, 1, cov=True)  # least squares, residual variance / (n - 2)
    table, fit = paper.v_composition(ours, tokens, writer, erasers)
    _check("fig5 writer DLA per token", name, table.writer_dla.to_numpy(), ref_x, TOKEN_TOL)
    _check("fig5 V-composition DLA per token", name, table.v_composition_dla.to_numpy(), ref_y, TOKEN_TOL)
    _check("fig5 fit", name, [fit["slope"], fit["intercept"], fit["slope_se"], fit["intercept_se"]],
           [slope, intercept, np.sqrt(cov[0, 0]), np.sqrt(cov[1, 1])], STAT_TOL)
    assert fit["n"] == ROWS * (SEQ - 1 - start)


def test_fig8_matches_the_authors(case):
    name, ours, theirs, writer, erasers, tokens = case
    wl, wh = _head(writer)
    layer = _head(erasers[0])[0]
    cache = _cache(theirs, tokens, {f"blocks.{wl}.attn.hook_pattern", f"blocks.{wl}.attn.hook_v",
                                    f"blocks.{layer}.attn.hook_result"})
    A = cache[f"blocks.{wl}.attn.hook_pattern"][:, wh].double()  # [B, query, key]
    v = cache[f"blocks.{wl}.attn.hook_v"][:, :, wh].double()  # [B, key, d_head]
    W_O = theirs.W_O[wl, wh].detach().double()
    parts = {"bos": (A[:, :, :1] @ v[:, :1]) @ W_O, "rest": (A[:, :, 1:] @ v[:, 1:]) @ W_O}
    heads = cache[f"blocks.{layer}.attn.hook_result"].double()  # [B, P, H, D]
    ours_v = bos_split_values(ours, tokens, writer, erasers)
    table = paper.bos_split(ours, tokens, writer, erasers)
    assert ours_v["heads"] == [f"L{layer}H{h}" for h in range(DIMS["n_heads"])]
    for part, r in parts.items():
        per_head = _pr(heads, r[:, :, None])  # [B, P, H]; NaN for a zero part, per head
        ref = np.nansum(per_head.numpy(), axis=-1)[:, :-1]  # pandas' groupby sum: NaN skipped; last position dropped
        _check(f"fig8 {part} per token", name, ours_v[f"pr_{part}"], ref, TOKEN_TOL)
        stats = np.stack([_stats(ref[:, p]) for p in range(ref.shape[1])])
        _check(f"fig8 {part} median, band", name, table[[f"pr_{part}_median", f"pr_{part}_q0.125", f"pr_{part}_q0.875"]]
               .to_numpy(), stats, STAT_TOL)
    assert table.rest_zero_rows.iloc[0] == ROWS  # position 0 has no non-BOS part


def test_the_variants_and_raw_weights_are_other_computations():
    """What the references above tell apart, on the random model: raw weights (PR is not invariant to
    centring the writing weights), fig 3 patching the erasers only, fig 4's all-position hook_z swap and
    fig 8's sum of the erasers each give other numbers than the authors' computation."""
    name, ours, _, writer, erasers, tokens = _build("random")
    raw = model_from_state_dict(DIMS, MODELS[name]()[0])
    processed = attribute_with_hooks(ours, tokens, [writer]).resid_pr
    assert _err(attribute_with_hooks(raw, tokens, [writer]).resid_pr, processed) > 1e-3
    paper_run, erasers_run = (causal_runs(ours, tokens, writer, erasers, method=m)[1] for m in ("paper", "erasers"))
    assert _err(erasers_run.resid_pr, paper_run.resid_pr) > 1e-3
    prompts = tokens[:2, :16]
    corpus = demo_corpus(4, 40, DIMS["d_vocab"], seed=32)
    at_last = resampled_dla(ours, prompts, [11, 12], [13, 14], "L1H4", corpus)[1]
    swapped = resampled_dla(ours, prompts, [11, 12], [13, 14], "L1H4", corpus, method="z_swap", n_samples=4)[1]
    assert _err(swapped, at_last) > 1e-3
    every = bos_split_values(ours, tokens, writer, erasers, method="erasers")["pr_bos"][:, :-1]
    assert _err(every, bos_split_values(ours, tokens, writer, erasers)["pr_bos"]) > 1e-3
