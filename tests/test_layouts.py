"""Block layouts built from TransformerLens configs (no Hugging Face model): TransformerLens 3.x
`HookedTransformer` configs of the families' layouts -- GPT-2, GPT-NeoX/Pythia (parallel blocks, partial
rotary), GPT-J, Llama (RMSNorm, grouped-query attention, gated MLP), Gemma 2 (post-norms, soft-capping),
BLOOM (ALiBi), attention-only -- and TransformerLens 4's native attention-only bridge, each against
TransformerLens's own cache (tests/tl_reference.py), plus a scan of the attention-only model on the
default backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erasure_fast as ef
from conftest import TL_MAJOR, _randomize_vectors
from tl_reference import check_against_cache

BACKENDS = [b for b in ("torch", "cpp") if ef.available_backends()[b].available]
SMALL = dict(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=97, n_ctx=64)
# HookedTransformerConfig arguments per layout (TransformerLens 3).
HOOKED_LAYOUTS = {
    "gpt2": dict(act_fn="gelu", normalization_type="LN", positional_embedding_type="standard"),
    "neox (parallel, partial rotary)": dict(act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                            rotary_dim=4, parallel_attn_mlp=True),
    "gptj (parallel, rotary)": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="rotary",
                                    rotary_dim=4, parallel_attn_mlp=True),
    "llama (RMS, GQA, gated)": dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                    n_key_value_heads=2, gated_mlp=True, final_rms=True),
    "gemma2 (post-norms, soft-caps)": dict(act_fn="gelu_pytorch_tanh", normalization_type="RMS",
                                           positional_embedding_type="rotary", n_key_value_heads=2, gated_mlp=True,
                                           use_normalization_before_and_after=True, attn_scores_soft_cap=50.0,
                                           output_logits_soft_cap=30.0, final_rms=True),
    "bloom (alibi)": dict(act_fn="gelu_fast", normalization_type="LN", positional_embedding_type="alibi",
                          post_embedding_ln=True),
    "attention-only": dict(act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", attn_only=True),
}
CASES = [(name, dtype) for name in HOOKED_LAYOUTS for dtype in (torch.float32, torch.float64)]


def _hooked(layout: str, dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**SMALL, **HOOKED_LAYOUTS[layout], seed=0, dtype=dtype)
    model = HookedTransformer(cfg).eval()
    _randomize_vectors(model, 0)
    return model


def _attn_only_bridge(dtype=torch.float32):
    import transformer_lens.model_bridge.sources.native  # noqa: F401 (registers boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(**SMALL, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                                  seed=0, attn_only=True)
    model = TransformerBridge.boot_native(cfg).to(dtype).eval()
    _randomize_vectors(model, 0)
    return model


def _attn_only(dtype=torch.float32):
    return _attn_only_bridge(dtype) if TL_MAJOR >= 4 else _hooked("attention-only", dtype)


if TL_MAJOR < 4:  # HookedTransformer was removed in TransformerLens 4 (`make test-tl3` runs these)
    @pytest.mark.parametrize("layout, dtype", CASES, ids=[f"{n.split()[0]}-{str(d)[6:]}" for n, d in CASES])
    def test_hooked_layout_matches_transformer_lens(layout, dtype):
        model = _hooked(layout, dtype)
        tokens = torch.randint(0, SMALL["d_vocab"], (2, 11), generator=torch.Generator().manual_seed(1))
        spec = ef.model_spec(model)
        assert spec.parallel_blocks == ("parallel" in layout) and spec.additive_blocks == ("post-norms" not in layout)
        assert spec.has_mlps == (layout != "attention-only")
        check_against_cache(model, tokens, writer=1, label=f"hooked {layout}", dtype=dtype, backends=BACKENDS,
                            tol=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_attention_only_model_matches_transformer_lens(dtype):
    """No MLP nodes; residual points resid_pre0 and resid_post{l} (no resid_mid: nothing reads it)."""
    model = _attn_only(dtype)
    tokens = torch.randint(0, SMALL["d_vocab"], (2, 11), generator=torch.Generator().manual_seed(2))
    res = ef.attribute(model, tokens, writers=["L0H1"])
    assert res.node_labels == ef.model_spec(model).head_labels() and res.resid_labels == ["resid_pre0", "resid_post0", "resid_post1"]
    check_against_cache(model, tokens, writer=1, label="attention-only", dtype=dtype, backends=BACKENDS,
                        tol=1e-5 if dtype == torch.float32 else 1e-10)


def test_scan_of_an_attention_only_model(tmp_path):
    """The scan that refused attention-only models: default backend, aggregates equal a direct attribution."""
    model = _attn_only()
    rows = np.random.default_rng(0).integers(0, SMALL["d_vocab"], size=(12, 16)).astype(np.int64)
    np.save(tmp_path / "c.npy", rows)
    res = ef.scan(model, str(tmp_path / "c.npy"), batch_size=4, writers=["L0H1"], out_dir=str(tmp_path / "out"),
                  progress=False)
    assert res.meta["backend"] == "cpp" and res.meta["tokens"] == 12 * 16  # the default backend on a CPU
    s = res.summary
    assert set(s[s.kind == "resid"].node) == {"resid_pre0", "resid_post0", "resid_post1"}
    assert not (s.node.astype(str).str.startswith("MLP")).any()
    direct = ef.attribute(model, torch.from_numpy(rows), writers=["L0H1"], backend="torch")
    row = s[(s.kind == "resid") & (s.node == "resid_post1") & (s.writer == "L0H1")].iloc[0]
    v = direct.resid_pr[:, :, direct.resid_labels.index("resid_post1"), 0].double().reshape(-1).numpy()
    assert row["mean"] == pytest.approx(float(np.nanmean(v)), rel=1e-4, abs=1e-6)
    assert (tmp_path / "out" / "report.md").exists()
