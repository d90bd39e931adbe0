"""`erasure-fast paper`: every analysis of the paper on one model, tables + PNGs + paper_report.md."""

from __future__ import annotations

import os
from typing import List

import numpy as np
import torch


def _model(name: str, device=None):
    """(model, label, erasers, note): 'auto' = real GELU-4L when cached, else the planted demo."""
    from . import paper
    from .demo import PLANTED, planted_model
    from .loading import ModelLoadError, load_model

    if name in ("auto", "gelu-4l"):
        try:
            model = load_model("gelu-4l", device=device)
            return model, "gelu-4l (NeelNanda/GELU_4L512W_C4_Code, local cache)", list(paper.DEFAULT_ERASERS), None
        except ModelLoadError as e:
            if name == "gelu-4l":
                raise
            print(f"GELU-4L is not cached here ({str(e).splitlines()[0][:80]}...); running on the planted demo model")
    if name in ("auto", "demo"):
        model, info = planted_model()
        model = model.to(device) if device else model
        return model, "demo (planted GELU-4L-shaped model)", list(PLANTED["erasers"]), info["note"]
    model = load_model(name, device=device)
    return model, name, list(paper.DEFAULT_ERASERS), None


def run(args) -> int:
    import pandas as pd

    from . import paper
    from .capture import model_device
    from .demo import PLANTED, demo_corpus

    model, label, erasers, note = _model(args.model, args.device)
    if args.erasers:
        erasers = [e.strip() for e in args.erasers.split(",")]
    writer = args.writer
    out = args.out
    os.makedirs(out, exist_ok=True)
    dev = model_device(model)
    d_vocab = model.cfg.d_vocab
    if args.corpus == "demo":
        corpus = demo_corpus(max(args.rows, 16), args.seq_len, d_vocab, seed=5)
        bos = PLANTED["bos"]
    else:
        from .scan import open_corpus

        c = open_corpus(args.corpus, seq_len=args.seq_len, tokenizer=getattr(model, "tokenizer", None))
        corpus = np.stack([r for _, r in zip(range(max(args.rows, 16)), (row for _, row in c.rows()))])
        bos = args.prepend_bos
    batch = torch.from_numpy(corpus[: args.rows].astype(np.int64)).to(dev)
    if bos is not None:
        batch[:, 0] = bos
    print(f"model: {label}; writer {writer}; erasers {', '.join(erasers)}; batch {tuple(batch.shape)}")
    md = [f"# The paper's analyses on {label}", ""]
    if note:
        md += [f"> {note}", ""]
    files: List[str] = []

    resid, nodes = paper.fig1_fig2(batch, writer, model=model, out_dir=out)
    resid.to_csv(os.path.join(out, "fig1_resid_pr.csv"), index=False)
    nodes.to_csv(os.path.join(out, "fig2_node_pr.csv"), index=False)
    down = nodes[nodes.downstream].sort_values("median").head(6)
    md += ["## Fig. 1 / 2: residual stream and node PR onto " + writer, "",
           "![fig1](paper_fig1_resid_pr.png)", "![fig2](paper_fig2_node_pr.png)", "",
           "Strongest erasers: " + ", ".join(f"{r.node} ({r.median:+.3f})" for r in down.itertuples()), ""]

    t3 = paper.causal_check(model, batch, writer, erasers, out_path=os.path.join(out, "fig3_causal_check.png"))
    t3.to_csv(os.path.join(out, "fig3_causal_check.csv"), index=False)
    md += ["## Fig. 3: causal check (writer's clean output removed from the erasers' value input)", "",
           "![fig3](fig3_causal_check.png)", "", "| node | PR clean | PR patched |", "|---|---|---|"]
    md += [f"| {r.node} | {r.clean_median:+.3f} | {r.patched_median:+.3f} |" for r in t3.itertuples()] + [""]

    prompts = paper.paper_prompts(model)
    tables = []
    if prompts:
        for text, ids, good, bad in prompts:
            t = paper.resample_ablation(model, ids[None].to(dev), [good], [bad], writer, corpus, n_samples=args.samples,
                                        labels=[text])
            tables.append(t)
        t4 = pd.concat(tables, ignore_index=True)
        src = "the paper's four adversarial prompts"
    else:
        rng = np.random.default_rng(0)
        P = min(32, args.seq_len - 1)
        prm = batch[:4, :P]
        good = batch[:4, P].tolist()
        bad = rng.integers(0, d_vocab, size=4).tolist()
        t4 = paper.resample_ablation(model, prm, good, bad, writer, corpus, n_samples=args.samples)
        src = "corpus windows (no tokenizer for the paper's prompts), true next token vs a random token"
    t4.to_csv(os.path.join(out, "fig4_resample_ablation.csv"), index=False)
    paper.plot_resample_ablation(t4, writer, os.path.join(out, "fig4_resample_ablation.png"))
    md += [f"## Fig. 4: {writer}'s DLA vs resample ablation of its input ({src})", "", "![fig4](fig4_resample_ablation.png)", "",
           "| prompt | clean DLA | resampled median [25 %, 75 %] |", "|---|---|---|"]
    md += [f"| {str(r.prompt)[:60]!s} | {r.clean_dla:+.3f} | {r.resampled_median:+.3f} [{r.resampled_q25:+.3f}, {r.resampled_q75:+.3f}] |"
           for r in t4.itertuples()] + [""]

    t5, fit = paper.v_composition(model, batch, writer, erasers, out_path=os.path.join(out, "fig5_v_composition.png"))
    _, fit_att = paper.v_composition(model, batch, writer, erasers, attention_aware=True,
                                     out_path=os.path.join(out, "fig5_v_composition_attention.png"))
    t5.to_csv(os.path.join(out, "fig5_v_composition.csv"), index=False)
    md += ["## Fig. 5: writer DLA vs V-composition DLA", "", "![fig5](fig5_v_composition.png) ![fig5a](fig5_v_composition_attention.png)", "",
           f"- same position (paper): slope {fit['slope']:.3f} ± {fit['slope_se']:.3f}, intercept {fit['intercept']:.4f} ± {fit['intercept_se']:.4f} (n={fit['n']})",
           f"- attention-aware: slope {fit_att['slope']:.3f} ± {fit_att['slope_se']:.3f}", "- published (GELU-4L, L0H2 vs L2H2-L2H7): slope -0.723 ± 0.013", ""]

    t8 = paper.bos_split(model, batch, writer, erasers, out_path=os.path.join(out, "fig8_bos_split.png"))
    t8.to_csv(os.path.join(out, "fig8_bos_split.csv"), index=False)
    md += ["## Fig. 8: erasure of the writer's BOS and non-BOS parts", "", "![fig8](fig8_bos_split.png)", "",
           f"Median over positions >= 1: PR onto BOS part {np.nanmedian(t8.pr_bos_median[1:]):+.3f}, onto the rest "
           f"{np.nanmedian(t8.pr_rest_median[1:]) if np.isfinite(t8.pr_rest_median[1:]).any() else float('nan'):+.3f}; "
           f"BOS share of |r_w|^2 {np.nanmedian(t8.bos_share_median[1:]):.3f}", ""]
    with open(os.path.join(out, "paper_report.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"\nwrote {out}/paper_report.md and its figures")
    return 0
