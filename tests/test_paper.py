"""The paper's analyses on ground truth: a small model with the demo's planted writer/eraser circuit
(writer L0H2, erasers L2H3 and L2H6). Runs on TransformerLens 4.x bridges and 3.x HookedTransformers.
tests/test_paper_reference.py checks each analysis against an independent implementation of the
authors' own code (TransformerLens 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erasure_fast as ef
from erasure_fast import paper
from erasure_fast.demo import PLANTED, demo_corpus, planted_model

DIMS = dict(n_layers=4, n_heads=8, d_head=32, d_model=256, d_mlp=256, d_vocab=300, n_ctx=128)
ERASERS = list(PLANTED["erasers"])


@pytest.fixture(scope="module")
def planted():
    model, info = planted_model(seed=0, dims=DIMS)
    tokens = torch.from_numpy(demo_corpus(4, 96, DIMS["d_vocab"], seed=9)).long()
    tokens[:, 0] = PLANTED["bos"]
    return model, tokens


def test_fig1_fig2_find_the_planted_eraser(planted, tmp_path):
    model, tokens = planted
    resid, nodes = paper.fig1_fig2(tokens, "L0H2", model=model, out_dir=str(tmp_path))
    down = nodes[nodes.downstream].sort_values("median")
    assert down.node.iloc[0] == "L2H3" and down.node.iloc[1] == "L2H6"
    r = resid.set_index("node")["median"]
    assert r["resid_mid0"] == pytest.approx(1.0, abs=0.05)  # the writer's own write
    assert r["resid_mid2"] < 0.5 * r["resid_post1"]  # erased in layer 2
    assert (tmp_path / "paper_fig1_resid_pr.png").stat().st_size > 0
    assert (tmp_path / "paper_fig2_node_pr.png").stat().st_size > 0


def test_fig3_patch_removes_erasure_and_writer_survives(planted, tmp_path):
    model, tokens = planted
    tables = {}
    for method in ("paper", "erasers"):
        t = paper.causal_check(model, tokens, "L0H2", ERASERS, method=method,
                               out_path=str(tmp_path / f"fig3_{method}.png")).set_index("node")
        for e in ERASERS:
            assert t.loc[e, "eraser"] and t.loc[e, "clean_median"] < -0.3
            assert abs(t.loc[e, "patched_median"]) < 0.25 * abs(t.loc[e, "clean_median"]), e
        assert t.loc["resid_post3", "clean_median"] < 0.2
        assert t.loc["resid_post3", "patched_median"] > 0.7  # the writer survives in the residual stream
        assert t.loc["resid_post1", "patched_median"] == pytest.approx(t.loc["resid_post1", "clean_median"])
        assert (tmp_path / f"fig3_{method}.png").stat().st_size > 0
        tables[method] = t
    # the authors patch (and show) every layer-2 head; the variant only the erasers, the others stay clean
    assert [n for n in tables["paper"].index if n.startswith("L")] == [f"L2H{h}" for h in range(8)]
    assert [n for n in tables["erasers"].index if n.startswith("L")] == ERASERS
    assert not np.isclose(tables["paper"].loc["resid_post3", "patched_median"],
                          tables["erasers"].loc["resid_post3", "patched_median"], rtol=1e-4)
    with pytest.raises(ValueError, match="method must be one of 'paper', 'erasers', got 'all'"):
        paper.causal_check(model, tokens, "L0H2", ERASERS, method="all")


def test_fig3_rejects_bad_erasers(planted):
    model, tokens = planted
    with pytest.raises(ValueError, match="share one layer"):
        paper.causal_check(model, tokens, "L0H2", ["L2H3", "L3H1"])
    with pytest.raises(ValueError, match="after the writer's layer"):
        paper.causal_check(model, tokens, "L2H2", ["L1H3"])


def test_fig5_slope_is_negative(planted, tmp_path):
    model, tokens = planted
    B, P = tokens.shape
    for aware in (False, True):
        table, fit = paper.v_composition(model, tokens, "L0H2", ERASERS, attention_aware=aware,
                                         out_path=str(tmp_path / f"fig5_{aware}.png"))
        # the authors' points: positions 32 .. P - 2 of every row
        assert len(table) == fit["n"] == B * (P - 1 - 32) and fit["start_pos"] == 32
        assert table.position.min() == 32 and table.position.max() == P - 2 and set(table.row) == set(range(B))
        assert fit["slope"] < 0 and fit["slope"] + 5 * fit["slope_se"] < 0, fit
    default, _ = paper.v_composition(model, tokens, "L0H2", ERASERS)
    every, _ = paper.v_composition(model, tokens, "L0H2", ERASERS, start_pos=0)
    assert len(every) == B * (P - 1)
    # the default's points are the every-position table's from position 32 on
    np.testing.assert_allclose(every[every.position >= 32].to_numpy(float), default.to_numpy(float), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="start_pos must be an int >= 0"):
        paper.v_composition(model, tokens, "L0H2", ERASERS, start_pos=-1)


def test_linear_fit_recovers_known_line():
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    y = 0.3 - 0.723 * x + rng.normal(scale=0.05, size=2000)
    fit = paper.linear_fit(x, y)
    assert fit["slope"] == pytest.approx(-0.723, abs=5 * fit["slope_se"])
    assert fit["intercept"] == pytest.approx(0.3, abs=5 * fit["intercept_se"])


def test_fig4_resample_ablation(planted, tmp_path):
    model, tokens = planted
    corpus = demo_corpus(16, 96, DIMS["d_vocab"], seed=11)
    paper_t = paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, n_samples=3,
                                      out_path=str(tmp_path / "fig4.png"))
    swap = paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, method="z_swap", n_samples=3)
    for table in (paper_t, swap):
        assert len(table) == 2 and np.isfinite(table[["clean_dla", "resampled_median"]].to_numpy()).all()
        assert (table.n_samples == 3).all()
    assert (tmp_path / "fig4.png").stat().st_size > 0
    # The planted writer's query is a bias and it reads BOS only: resampling its input at the last
    # position (the authors') leaves its output there as it was; swapping in its output from donor
    # windows (BOS nowhere) changes it.
    np.testing.assert_allclose(paper_t.resampled_median, paper_t.clean_dla, rtol=1e-5, atol=1e-6)
    assert not np.allclose(swap.clean_dla, swap.resampled_median)
    assert (paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus).n_samples == 16).all()


def test_fig4_paper_method_is_the_heads_own_input_resampled_at_the_last_position(planted):
    """The paper method (the layer's input replaced at the last position) against another way to the
    same intervention: the head's own query, key and value at the last position taken from the donor
    run (hook_q / hook_k / hook_v), DLA of its output there under the clean final scale. A head that
    attends by content (L1H4, random weights), so that the last position's key and query matter."""
    from erasure_fast.paper.resample import resampled_dla

    model, tokens = planted
    spec = ef.model_spec(model)
    prompts, correct, incorrect = tokens[:2, :20], [5, 6], [7, 8]
    corpus = demo_corpus(3, 40, DIMS["d_vocab"], seed=4)
    clean, samples = resampled_dla(model, prompts, correct, incorrect, "L1H4", corpus)
    assert samples.shape == (2, 3)
    layer, head = 1, 4
    names = [f"blocks.{layer}.attn.hook_{k}" for k in "qkv"]
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts)
        W_U = model.W_U.detach().double()
        d = (W_U[:, correct] - W_U[:, incorrect]).T  # [2, D]
        s = cache["ln_final.hook_scale"][:, -1, 0].double()
        for i in range(3):
            _, donor = model.run_with_cache(torch.from_numpy(corpus[i:i + 1, :20]).long())

            def take(t, hook=None):
                t = t.clone()
                t[:, -1, head] = donor[hook.name][0, -1, head].to(t)
                return t

            z = {}

            def keep(t, hook=None):
                z["z"] = t.clone()

            model.run_with_hooks(prompts, fwd_hooks=[(n, take) for n in names] + [(f"blocks.{layer}.attn.hook_z", keep)])
            r = z["z"][:, -1, head].double() @ model.W_O[layer, head].detach().double()
            ref = ((r - r.mean(-1, keepdim=True)) * d).sum(-1) / s
            np.testing.assert_allclose(samples[:, i].numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
        r0 = cache[f"blocks.{layer}.attn.hook_z"][:, -1, head].double() @ model.W_O[layer, head].detach().double()
        np.testing.assert_allclose(clean.numpy(), (((r0 - r0.mean(-1, keepdim=True)) * d).sum(-1) / s).numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert spec.head_label(layer * spec.n_heads + head) == "L1H4"
    assert not np.allclose(samples.numpy(), clean[:, None].numpy(), rtol=1e-3)  # the patch does something


def test_fig8_bos_split(planted, tmp_path):
    model, tokens = planted
    B, P = tokens.shape
    table = paper.bos_split(model, tokens, "L0H2", ERASERS, out_path=str(tmp_path / "fig8.png"))
    assert len(table) == P - 1  # the last position dropped, as the authors do
    assert table.attrs["heads"] == [f"L2H{h}" for h in range(8)]
    # the planted writer reads BOS almost only: its output is (almost) all BOS part, and that part is erased
    assert table.bos_share_median.iloc[5:].min() > 0.99
    assert table.pr_bos_median.iloc[5:].max() < -0.5
    # its non-BOS part is tiny but computed directly, so finite and not zero, from position 1 on;
    # position 0 attends to itself only: no non-BOS part in any row, PR 0 as in the authors' sum
    assert (table.rest_zero_rows.iloc[1:] == 0).all() and table.rest_zero_rows.iloc[0] == B
    assert np.isfinite(table.filter(like="pr_rest").to_numpy()).all()
    assert (table.loc[0, ["pr_rest_median", "pr_rest_q0.125", "pr_rest_q0.875"]] == 0).all()
    assert (table.pr_rest_median.iloc[1:] != 0).all()
    erasers = paper.bos_split(model, tokens, "L0H2", ERASERS, method="erasers")
    assert len(erasers) == P and erasers.attrs["heads"] == ERASERS
    assert (tmp_path / "fig8.png").stat().st_size > 0


def test_fig8_parts_are_computed_directly(planted):
    """The BOS part and the rest from the writer's cached pattern and values, each summed directly,
    against `bos_split_values`; their sum is the writer's output."""
    from erasure_fast.paper.bos_split import bos_split_values

    model, tokens = planted
    v = bos_split_values(model, tokens, "L0H2", ERASERS, method="erasers")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    A = cache["blocks.0.attn.hook_pattern"][:, 2].double()
    val = cache["blocks.0.attn.hook_v"][:, :, 2].double()
    W_O = model.W_O.detach().double()
    r_bos = (A[:, :, :1] @ val[:, :1]) @ W_O[0, 2]
    r_rest = (A[:, :, 1:] @ val[:, 1:]) @ W_O[0, 2]
    r_sum = sum(cache["blocks.2.attn.hook_z"][:, :, h].double() @ W_O[2, h] for h in (3, 6))
    pr = lambda a, w: (a * w).sum(-1) / (w * w).sum(-1)  # noqa: E731
    np.testing.assert_allclose(v["pr_bos"].numpy(), pr(r_sum, r_bos).numpy(), rtol=1e-5)
    rest = pr(r_sum, r_rest)
    assert torch.isnan(rest[:, 0]).all() and v["rest_zero"][:, 0].all() and (v["pr_rest"][:, 0] == 0).all()
    np.testing.assert_allclose(v["pr_rest"][:, 1:].numpy(), rest[:, 1:].numpy(), rtol=1e-4)


@pytest.fixture(scope="module")
def planted_scan(planted, tmp_path_factory):
    """(scanned corpus, ScanResult) of the planted model over 8 synthetic rows, BOS prepended."""
    from erasure_fast.scanning import scan

    model, _ = planted
    corpus = demo_corpus(8, 96, DIMS["d_vocab"], seed=2)
    res = scan(model, corpus, writers=["L0H2"], batch_size=4, out_dir=str(tmp_path_factory.mktemp("scan")),
               prepend_bos=PLANTED["bos"], progress=False, report=True)
    return corpus, res


def test_miner_ranks_and_rechecks_scan_candidates(planted, planted_scan):
    model, _ = planted
    corpus, res = planted_scan
    table = paper.mine_adversarial(model, res, corpus, writer="L0H2", erasers=ERASERS, top=5, recheck=2)
    assert len(table) == 5
    gaps = table.gap.to_numpy()
    assert np.all(np.diff(gaps) <= 1e-9) and gaps[0] > 0  # ranked by |DLA| - |adjusted DLA|
    # the scan's numbers are those of a direct attribution at that position (BOS prepended as scanned)
    best = table.iloc[0]
    row = torch.from_numpy(np.concatenate([[PLANTED["bos"]], corpus[best.row][:-1]]).astype(np.int64))[None]
    direct = ef.attribute(model, row, writers=["L0H2"])
    assert float(direct.writer_dla[0, best.pos, 0]) == pytest.approx(best.dla, rel=1e-4, abs=1e-6)
    # the causal re-check removes the erasure
    assert best.erasers_pr_clean < -0.5 and abs(best.erasers_pr_patched) < 0.25 * abs(best.erasers_pr_clean)
    with pytest.raises(ValueError, match="not L1H0"):
        paper.mine_adversarial(model, res, corpus, writer="L1H0", erasers=ERASERS)


def test_miner_refuses_inputs_that_do_not_match_the_scan(planted, planted_scan, tmp_path):
    import copy

    model, _ = planted
    corpus, res = planted_scan
    with pytest.raises(ValueError, match="not the corpus the scan read.*n_rows 6 here vs 8"):
        paper.mine_adversarial(model, res, corpus[:6], writer="L0H2", erasers=ERASERS)
    with pytest.raises(ValueError, match="not the corpus the scan read"):  # same shape, other tokens
        paper.mine_adversarial(model, res, demo_corpus(8, 96, DIMS["d_vocab"], seed=3), writer="L0H2", erasers=ERASERS)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="another model"):
        paper.mine_adversarial(other, res, corpus, writer="L0H2", erasers=ERASERS)
    with pytest.raises(ValueError, match="share one layer"):
        paper.mine_adversarial(model, res, corpus, writer="L0H2", erasers=["L2H3", "L3H1"])
    with pytest.raises(ValueError, match="no summary.json"):
        paper.mine_adversarial(model, str(tmp_path), corpus, writer="L0H2", erasers=ERASERS)


def test_fig5_rejects_erasers_not_after_the_writer(planted):
    model, tokens = planted
    with pytest.raises(ValueError, match="after the writer's layer"):
        paper.v_composition(model, tokens, "L2H2", ["L1H3"])
    with pytest.raises(ValueError, match="fewer than 3"):
        paper.v_composition(model, tokens[:1, :3], "L0H2", ERASERS, start_pos=0)
    with pytest.raises(ValueError, match="fewer than 3 next-token points from position 32"):
        paper.v_composition(model, tokens[:1, :34], "L0H2", ERASERS)


def test_fig4_checks_its_arguments_and_its_median_lies_between_the_quartiles(planted):
    model, tokens = planted
    corpus = demo_corpus(16, 96, DIMS["d_vocab"], seed=11)
    with pytest.raises(ValueError, match="n_samples"):
        paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, n_samples=0)
    with pytest.raises(ValueError, match="corpus must be"):
        paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus[:, :10])
    with pytest.raises(ValueError, match="n_samples 17 exceeds the corpus's 16 rows"):
        paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, n_samples=17)
    with pytest.raises(ValueError, match="method must be one of 'paper', 'z_swap', got 'swap'"):
        paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, method="swap")
    # an even number of samples: the median is the midpoint, not torch's lower middle value
    table = paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, method="z_swap", n_samples=2)
    assert (table["resampled_q0.125"] <= table.resampled_median).all()
    assert (table.resampled_median <= table["resampled_q0.875"]).all()


def test_paper_prompts_need_a_tokenizer(planted):
    model, _ = planted
    assert paper.paper_prompts(model) is None
    assert paper.paper_prompts_unavailable(model) == "the model has no tokenizer"


def test_capture_engine_and_hooks_give_the_same_figures(planted):
    """figs 1/2, 4 (clean and donor runs) and 8 (full run) on the capture engine and on hooks: the same
    tables; the engine's activations equal hook capture's within fp32 rounding."""
    from erasure_fast.engine import engine_problem

    model, tokens = planted
    assert engine_problem(model, ef.model_spec(model)) is None  # the planted model is the engine's
    corpus = demo_corpus(16, 96, DIMS["d_vocab"], seed=11)
    runs = {}
    for capture in ("engine", "hooks"):
        resid, nodes = paper.fig1_fig2(tokens, "L0H2", model=model, capture=capture)
        fig4 = paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, n_samples=3, capture=capture)
        fig8 = paper.bos_split(model, tokens, "L0H2", ERASERS, capture=capture)
        runs[capture] = (resid, nodes, fig4, fig8)
    for a, b in zip(runs["engine"], runs["hooks"]):
        num = a.select_dtypes("number").columns
        np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-4, atol=1e-5)
    for fn in (lambda c: paper.fig1_fig2(tokens, "L0H2", model=model, capture=c),
               lambda c: paper.bos_split(model, tokens, "L0H2", ERASERS, capture=c),
               lambda c: paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, capture=c)):
        with pytest.raises(ValueError, match="capture must be one of 'auto', 'engine', 'hooks', got 'fast'"):
            fn("fast")
