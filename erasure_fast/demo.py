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
