"""Loading GELU-4L from the local Hugging Face cache and TL-style checkpoint directories (offline)."""

from __future__ import annotations

import os

import pytest
import torch

import erasure_fast as ef
from erasure_fast.loading import GELU_4L_REPO, ModelLoadError, load_model
from conftest import TL_MAJOR, write_tl_checkpoint

DIMS = dict(n_layers=2, n_heads=4, d_head=6, d_model=24, d_mlp=40, d_vocab=61, n_ctx=32)


def fake_hf_cache(root, repo: str, dims: dict):
    """The hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    sd = write_tl_checkpoint(snap, dims, seed=4)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return sd


def check_weights(model, sd):
    L = DIMS["n_layers"]
    W_O = torch.stack([sd[f"blocks.{l}.attn.W_O"] for l in range(L)])
    assert torch.equal(model.W_O.detach().cpu(), W_O)
    assert torch.equal(model.W_U.detach().cpu(), sd["unembed.W_U"])
    assert torch.equal(model.W_E.detach().cpu(), sd["embed.W_E"])


def test_gelu4l_from_local_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = fake_hf_cache(tmp_path, GELU_4L_REPO, DIMS)
    for name in ("gelu-4l", GELU_4L_REPO):
        model = load_model(name, cache_dir=str(tmp_path))
        check_weights(model, sd)
    res = ef.attribute(model, torch.randint(0, 61, (2, 9)), writers=["L0H2"])
    assert res.dla.shape == (2, 9, 2, 4) and torch.isfinite(res.dla[:, :-1]).all()


def test_missing_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*huggingface-cli download NeelNanda/GELU_4L512W_C4_Code"):
        load_model("gelu-4l", cache_dir=str(tmp_path))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_directory(tmp_path, fmt):
    sd = write_tl_checkpoint(tmp_path, DIMS, seed=9, fmt=fmt)
    model = load_model(str(tmp_path))
    check_weights(model, sd)
    if TL_MAJOR >= 4:
        assert type(model).__name__ == "TransformerBridge"


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    write_tl_checkpoint(tmp_path, DIMS, seed=1)
    os.remove(tmp_path / "model_final.pth")
    with pytest.raises(ModelLoadError, match="no model.safetensors and no \\*.pth"):
        load_model(str(tmp_path))
    write_tl_checkpoint(tmp_path, dict(DIMS, d_head=5, n_heads=4), seed=1)  # config says d_head 5
    import json

    cfg = json.load(open(tmp_path / "config.json"))
    cfg["d_head"] = 6
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ModelLoadError, match="weights do not match config.json"):
        load_model(str(tmp_path))
    torch.save({"x": torch.zeros(1)}, tmp_path / "model_final.pth")
    (tmp_path / "model_final.pth").write_bytes(b"not a zip file")
    with pytest.raises(ModelLoadError, match="cannot be read as a state dict with weights_only=True"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown model 'nonsense'"):
        load_model("nonsense")


def test_model_paths_expand_and_a_missing_directory_is_not_a_repo(tmp_path, monkeypatch):
    """'~/m' and '$VAR/m' are the folder they name; './nonexistent_dir' was taken for a hub repo and
    answered with `huggingface-cli download ./nonexistent_dir`."""
    sd = write_tl_checkpoint(tmp_path / "m", DIMS, seed=2)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EF_TEST_MODELS", str(tmp_path))
    for name in ("~/m", "$EF_TEST_MODELS/m"):
        check_weights(load_model(name), sd)
    monkeypatch.chdir(tmp_path)
    for name in ("./nonexistent_dir", "../nowhere", "a/b/c", "~/none"):
        with pytest.raises(ModelLoadError, match=r"no such directory$") as e:
            load_model(name)
        assert "huggingface-cli" not in str(e.value)
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"m.bin: not a directory; a model is a checkpoint directory"):
        load_model("m.bin")
    with pytest.raises(ValueError, match=r"device: the meta device holds no values to analyse"):
        load_model("~/m", device="meta")


def test_from_pretrained_processing_keeps_the_model_and_centres_its_outputs(tmp_path):
    """processing="from_pretrained" (TransformerLens's from_pretrained defaults): the same logits up to
    a constant per position, norms with weight 1 and bias 0 (LNPre's computation), value biases folded
    into b_O, writing weights and W_U centred. tests/test_paper_reference.py compares the weights with
    TransformerLens's own processing."""
    from erasure_fast.demo import random_tl_state_dict
    from erasure_fast.tl_models import from_pretrained_processing, model_from_tl_state_dict

    sd = random_tl_state_dict(DIMS, seed=5)
    g = torch.Generator().manual_seed(6)
    for key in sd:  # random norms and biases, so that every step has something to do
        if sd[key].ndim <= 2 and (".ln" in key or key.startswith("ln") or ".b_" in key):
            sd[key] = sd[key] + 0.3 * torch.randn(sd[key].shape, generator=g)
    cfg = dict(DIMS, act_fn="gelu", normalization_type="LN", attn_only=False)
    raw, done = (model_from_tl_state_dict(cfg, sd, processing=p) for p in ("raw", "from_pretrained"))
    tokens = torch.randint(0, DIMS["d_vocab"], (2, 9), generator=g)
    with torch.no_grad():
        a, b = raw(tokens).double(), done(tokens).double()
    assert torch.allclose(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-3)  # center_unembed moved the logits
    p = from_pretrained_processing(cfg, sd)
    for l in range(DIMS["n_layers"]):
        for norm in ("ln1", "ln2"):
            assert torch.equal(p[f"blocks.{l}.{norm}.w"], torch.ones(DIMS["d_model"]))
            assert torch.equal(p[f"blocks.{l}.{norm}.b"], torch.zeros(DIMS["d_model"]))
        assert torch.equal(p[f"blocks.{l}.attn.b_V"], torch.zeros_like(sd[f"blocks.{l}.attn.b_V"]))
        for key in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out"):
            assert float(p[f"blocks.{l}.{key}"].mean(-1).abs().max()) < 1e-6, key
        assert float(p[f"blocks.{l}.attn.W_V"].mean(1).abs().max()) < 1e-6  # reads a centred input
    assert float(p["unembed.W_U"].mean(-1).abs().max()) < 1e-6 and float(p["unembed.W_U"].mean(0).abs().max()) < 1e-6
    assert torch.equal(sd["unembed.W_U"], random_tl_state_dict(DIMS, seed=5)["unembed.W_U"])  # the input is left alone


def test_processing_is_checked_first_and_hugging_face_checkpoints_load_raw(tmp_path):
    from hf_families import save_family

    write_tl_checkpoint(tmp_path / "tl", DIMS)
    with pytest.raises(ValueError, match="processing must be one of 'raw', 'from_pretrained', got 'folded'"):
        load_model(str(tmp_path / "no_such_dir"), processing="folded")  # before the path is looked at
    model = load_model(str(tmp_path / "tl"), processing="from_pretrained")
    assert float(model.W_O.detach().mean(-1).abs().max()) < 1e-6
    hf = save_family("GPT2LMHeadModel", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="a Hugging Face checkpoint is bridged as stored; processing='from_pretrained'"):
        load_model(hf, processing="from_pretrained")
