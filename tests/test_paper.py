"""The paper's analyses on ground truth: a small model with the demo's planted writer/eraser circuit
(writer L0H2, erasers L2H3 and L2H6). Runs on TransformerLens 4.x bridges and 3.x HookedTransformers."""

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
    t = paper.causal_check(model, tokens, "L0H2", ERASERS, out_path=str(tmp_path / "fig3.png")).set_index("node")
    for e in ERASERS:
        assert t.loc[e, "clean_median"] < -0.3
        assert abs(t.loc[e, "patched_median"]) < 0.25 * abs(t.loc[e, "clean_median"]), e
    assert t.loc["resid_post3", "clean_median"] < 0.2
    assert t.loc["resid_post3", "patched_median"] > 0.7  # the writer survives in the residual stream
    assert t.loc["resid_post1", "patched_median"] == pytest.approx(t.loc["resid_post1", "clean_median"])
    assert (tmp_path / "fig3.png").stat().st_size > 0


def test_fig3_rejects_bad_erasers(planted):
    model, tokens = planted
    with pytest.raises(ValueError, match="share one layer"):
        paper.causal_check(model, tokens, "L0H2", ["L2H3", "L3H1"])
    with pytest.raises(ValueError, match="after the writer's layer"):
        paper.causal_check(model, tokens, "L2H2", ["L1H3"])


def test_fig5_slope_is_negative(planted, tmp_path):
    model, tokens = planted
    for aware in (False, True):
        table, fit = paper.v_composition(model, tokens, "L0H2", ERASERS, attention_aware=aware,
                                         out_path=str(tmp_path / f"fig5_{aware}.png"))
        assert len(table) == tokens.shape[0] * (tokens.shape[1] - 1)
        assert fit["slope"] < 0 and fit["slope"] + 5 * fit["slope_se"] < 0, fit


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
    table = paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, n_samples=3,
                                    out_path=str(tmp_path / "fig4.png"))
    assert len(table) == 2 and np.isfinite(table[["clean_dla", "resampled_median"]].to_numpy()).all()
    # The planted writer only reads BOS: with BOS kept in place its DLA does not depend on the rest, and
    # resampling its whole input (BOS included) changes it.
    assert not np.allclose(table.clean_dla, table.resampled_median)


def test_fig8_bos_split(planted, tmp_path):
    model, tokens = planted
    table = paper.bos_split(model, tokens, "L0H2", ERASERS, out_path=str(tmp_path / "fig8.png"))
    assert len(table) == tokens.shape[1]
    # the planted writer reads BOS only: its output is (almost) all BOS part, and that part is erased
    assert table.bos_share_median.iloc[5:].min() > 0.99
    assert table.pr_bos_median.iloc[5:].max() < -0.5


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
        paper.v_composition(model, tokens[:1, :3], "L0H2", ERASERS)


def test_fig4_checks_its_arguments_and_its_median_lies_between_the_quartiles(planted):
    model, tokens = planted
    corpus = demo_corpus(16, 96, DIMS["d_vocab"], seed=11)
    with pytest.raises(ValueError, match="n_samples"):
        paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, n_samples=0)
    with pytest.raises(ValueError, match="corpus must be"):
        paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus[:, :10])
    # an even number of samples: the median is the midpoint, not torch's lower middle value
    table = paper.resample_ablation(model, tokens[:2, :24], [5, 6], [7, 8], "L0H2", corpus, n_samples=2)
    assert (table.resampled_q25 <= table.resampled_median).all() and (table.resampled_median <= table.resampled_q75).all()


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
