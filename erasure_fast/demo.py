"""The embedded default job: DLA and erasure of a GELU-4L-shaped model on a deterministic batch."""

from __future__ import annotations

import time
from typing import List

import torch

GELU_4L_SHAPE = dict(d_model=512, n_layers=4, n_heads=8, d_head=64, d_mlp=2048, d_vocab=48262, n_ctx=1024)


def gelu4l_shaped_bridge(seed: int = 0, **overrides):
    """A randomly initialised TransformerLens 4 bridge with GELU-4L's shape (no download needed)."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401 (registers boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    dims = {**GELU_4L_SHAPE, **overrides}
    cfg = TransformerBridgeConfig(
        **dims, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=seed
    )
    model = TransformerBridge.boot_native(cfg)
    model.eval()
    return model


def random_tl_state_dict(dims: dict, seed: int = 0) -> dict:
    """Random weights in HookedTransformer naming (the layout of NeelNanda/* checkpoints).
    Weights ~ N(0, (0.8 / sqrt(d_model))^2) as TransformerLens initialises, LN weight 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    D, L, H, dh, F, V, C = (dims[k] for k in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"))
    std = 0.8 / D**0.5

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"embed.W_E": rnd(V, D), "pos_embed.W_pos": rnd(C, D)}
    for l in range(L):
        p = f"blocks.{l}."
        sd.update({
            p + "ln1.w": torch.ones(D), p + "ln1.b": torch.zeros(D),
            p + "attn.W_Q": rnd(H, D, dh), p + "attn.W_K": rnd(H, D, dh), p + "attn.W_V": rnd(H, D, dh),
            p + "attn.W_O": rnd(H, dh, D),
            p + "attn.b_Q": torch.zeros(H, dh), p + "attn.b_K": torch.zeros(H, dh), p + "attn.b_V": torch.zeros(H, dh),
            p + "attn.b_O": torch.zeros(D),
            p + "ln2.w": torch.ones(D), p + "ln2.b": torch.zeros(D),
            p + "mlp.W_in": rnd(D, F), p + "mlp.b_in": torch.zeros(F), p + "mlp.W_out": rnd(F, D), p + "mlp.b_out": torch.zeros(D),
        })
    sd.update({"ln_final.w": torch.ones(D), "ln_final.b": torch.zeros(D), "unembed.W_U": rnd(D, V), "unembed.b_U": torch.zeros(V)})
    return sd


def bridge_from_state_dict(dims: dict, sd: dict, name: str = "native"):
    """TL 4 bridge with GELU-style config ``dims`` and HookedTransformer-named weights ``sd``."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    cfg = TransformerBridgeConfig(**dims, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard")
    model = TransformerBridge.boot_native(cfg, model_name=name)
    model.load_state_dict(convert_tl_checkpoint(sd, cfg), strict=True)
    model.eval()
    return model


PLANTED = {"writer": "L0H2", "erasers": {"L2H3": -0.8, "L2H6": -0.4}, "bos": 0}


def demo_corpus(n_rows: int = 64, seq_len: int = 1024, d_vocab: int = GELU_4L_SHAPE["d_vocab"], seed: int = 0):
    """Deterministic synthetic token rows [n_rows, seq_len] (Zipf-distributed ids, like text)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.3, size=(n_rows, seq_len)) - 1
    perm = rng.permutation(d_vocab)  # frequent ids spread over the vocabulary
    return perm[np.minimum(ranks, d_vocab - 1)].astype(np.int32)


def planted_model(seed: int = 0, dims: dict = None, planted: dict = None):
    """GELU-4L-shaped bridge with a planted erasure circuit; returns (model, description).

    Writer L0H2 attends uniformly (zero QK) and its output is made 4x larger. Erasers L2H3 and L2H6
    attend uniformly too, read the writer's output subspace (W_V = an orthonormal basis Q of the
    row space of W_O[L0H2]) and write it back negated (W_O = -a Q^T); each a is calibrated on a
    fixed batch so that the eraser's median projection ratio onto L0H2 is the planted target
    (PR is linear in a). Everything else is random, so the scan should rank these pairs first.
    """
    dims = dict(dims or GELU_4L_SHAPE)
    planted = dict(planted or PLANTED)
    sd = random_tl_state_dict(dims, seed)
    wl, wh = (int(x) for x in planted["writer"][1:].split("H"))
    sd[f"blocks.{wl}.attn.W_Q"][wh] = 0
    sd[f"blocks.{wl}.attn.W_K"][wh] = 0
    sd[f"blocks.{wl}.attn.W_O"][wh] *= 4
    basis, _ = torch.linalg.qr(sd[f"blocks.{wl}.attn.W_O"][wh].T)  # [d_model, d_head], orthonormal columns
    erasers = []
    for label in planted["erasers"]:
        el, eh = (int(x) for x in label[1:].split("H"))
        sd[f"blocks.{el}.attn.W_Q"][eh] = 0
        sd[f"blocks.{el}.attn.W_K"][eh] = 0
        sd[f"blocks.{el}.attn.W_V"][eh] = basis
        sd[f"blocks.{el}.attn.W_O"][eh] = -basis.T
        erasers.append((label, el, eh))
    model = bridge_from_state_dict(dims, sd, name="demo-planted-gelu4l")
    # Calibrate each eraser's gain on a fixed batch (BOS prepended like the scan).
    from . import attribute

    calib = torch.from_numpy(demo_corpus(2, dims["n_ctx"], dims["d_vocab"], seed=seed + 1)).long()
    calib[:, 0] = planted["bos"]
    res = attribute(model, calib, writers=[planted["writer"]], backend="torch")
    gains = {}
    for label, el, eh in erasers:
        node = res.node_labels.index(label)
        median = float(res.pr[..., node, 0].reshape(-1).median())
        gains[label] = planted["erasers"][label] / median
        sd[f"blocks.{el}.attn.W_O"][eh] *= gains[label]
    model = bridge_from_state_dict(dims, sd, name="demo-planted-gelu4l")
    info = dict(planted, gains=gains, seed=seed, note=(
        f"Synthetic model: GELU-4L shape with random weights (seed {seed}) and a planted erasure circuit: "
        f"writer {planted['writer']}, erasers " + ", ".join(f"{k} (target median PR {v})" for k, v in planted["erasers"].items())
        + ". Real GELU-4L weights were not available."))
    return model, info


def pair_table(result, top: int = 10) -> List[dict]:
    """Strongest writer -> downstream node pairs by |median PR| over all positions."""
    pr = result.pr.reshape(-1, *result.pr.shape[-2:]).double()  # [T, n_nodes, W]
    rows = []
    down = result.downstream.cpu()
    for wi, wlabel in enumerate(result.writer_labels):
        for ni, nlabel in enumerate(result.node_labels):
            if not down[ni, wi]:
                continue
            v = pr[:, ni, wi].cpu()
            v = v[~torch.isnan(v)]
            if v.numel() == 0:
                continue
            q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype))
            rows.append(dict(writer=wlabel, node=nlabel, median=float(q[1]), q25=float(q[0]), q75=float(q[2]), n=int(v.numel())))
    rows.sort(key=lambda r: -abs(r["median"]))
    return rows[:top]


def run_demo(batch: int = 4, pos: int = 128, backend: str = "auto", top: int = 12, seed: int = 0) -> dict:
    from . import attribute, backends

    print("erasure_fast demo: GELU-4L-shaped TransformerLens 4 bridge (random weights, seed "
          f"{seed}; real GELU-4L weights cannot be downloaded here)")
    for name, info in backends().items():
        print(f"  backend {name:7s} {'yes' if info.available else 'no '}  {info.detail}")
    t0 = time.perf_counter()
    model = gelu4l_shaped_bridge(seed=seed)
    t_load = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    attribute(model, tokens[:, :8], backend=backend)  # warm-up (first-call set-up, W_U table)
    t0 = time.perf_counter()
    res = attribute(model, tokens, backend=backend)
    t_attr = time.perf_counter() - t0
    print(f"model built in {t_load:.1f} s; attribute() on {batch}x{pos} tokens, {len(res.writer_labels)} writers, "
          f"backend {res.backend}: {t_attr * 1e3:.0f} ms")
    rows = pair_table(res, top)
    print(f"\nStrongest writer -> downstream node pairs (projection ratio, over {rows[0]['n'] if rows else 0} tokens)")
    print(f"{'writer':>7} {'node':>6} {'median PR':>10} {'25%':>8} {'75%':>8}")
    for r in rows:
        print(f"{r['writer']:>7} {r['node']:>6} {r['median']:>10.4f} {r['q25']:>8.4f} {r['q75']:>8.4f}")
    dla = res.dla[:, :-1].reshape(-1, len(res.writer_labels)).double()
    adj = res.adjusted_dla[:, :-1].reshape(-1, len(res.writer_labels)).double()
    order = dla.abs().mean(0).argsort(descending=True)[:5]
    print("\nHeads with the largest mean |next-token DLA| and their erasure-adjusted DLA")
    print(f"{'head':>6} {'mean|DLA|':>10} {'mean|adj DLA|':>14}")
    for i in order.tolist():
        print(f"{res.writer_labels[i]:>6} {float(dla[:, i].abs().mean()):>10.4f} {float(adj[:, i].abs().nanmean()):>14.4f}")
    resid = res.resid_pr.reshape(-1, *res.resid_pr.shape[-2:]).double().nanmedian(dim=0).values  # [R, W]
    print("\nMedian residual-stream PR onto L0H2 (cf. the paper's Fig. 1)")
    w = res.writer_labels.index("L0H2")
    print("  " + "  ".join(f"{lab}={float(resid[i, w]):.3f}" for i, lab in enumerate(res.resid_labels)))
    return dict(rows=rows, seconds=t_attr, backend=res.backend)
