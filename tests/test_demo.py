"""The planted demo model: its ground truth comes from TransformerLens's activations in closed form,
so the package's attribution can be checked against it (not calibrated by it)."""

from __future__ import annotations

import torch

import erasure_fast as ef
from erasure_fast.demo import PLANTED, demo_corpus, planted_model

DIMS = dict(n_layers=4, n_heads=8, d_head=32, d_model=256, d_mlp=256, d_vocab=300, n_ctx=128)


def test_planted_erasers_have_their_target_median_pr_by_every_backend():
    model, info = planted_model(seed=0, dims=DIMS)
    calib = torch.from_numpy(demo_corpus(2, DIMS["n_ctx"], DIMS["d_vocab"], seed=1)).long()  # the calibration batch
    calib[:, 0] = PLANTED["bos"]
    for backend in ("torch", "cpp"):
        res = ef.attribute(model, calib, writers=[PLANTED["writer"]], backend=backend)
        for label, target in PLANTED["erasers"].items():
            median = float(res.pr[..., res.node_labels.index(label), 0].reshape(-1).median())
            assert abs(median - target) < 1e-4, (backend, label, median, target)
    assert all(g > 0 for g in info["gains"].values())


def test_calibration_does_not_call_the_attribution_code(monkeypatch):
    import erasure_fast.attribution as attribution

    def forbidden(*a, **k):
        raise AssertionError("the demo's ground truth must not come from the code under test")

    monkeypatch.setattr(attribution, "run_attribution", forbidden)
    monkeypatch.setattr(attribution, "attribute", forbidden)
    monkeypatch.setattr(ef, "attribute", forbidden)
    planted_model(seed=0, dims=dict(DIMS, n_ctx=32, d_vocab=100))
