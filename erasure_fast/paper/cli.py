"""`erasure-fast paper`: every analysis of the paper on one model, tables + PNGs + paper_report.md."""

from __future__ import annotations

import os
import numpy as np
import torch


def _model(name: str, device=None):
    """(model, label, erasers, note): 'auto' = real GELU-4L when cached, else the planted demo."""
    from .. import paper
    from ..demo import PLANTED, planted_model
    from ..loading import ModelLoadError, load_model

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


ANALYSES = ("all", "fig1", "fig2", "fig3", "fig4", "fig5", "fig8", "mine")


def run(args) -> int:
    from .. import paper
    from ..capture import model_device
    from ..demo import PLANTED, demo_corpus

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
        from ..scanning import open_corpus

        c = open_corpus(args.corpus, seq_len=args.seq_len, tokenizer=getattr(model, "tokenizer", None))
        corpus = np.stack([r for _, r in zip(range(max(args.rows, 16)), (row for _, row in c.rows()))])
        bos = args.prepend_bos
    batch = torch.from_numpy(corpus[: args.rows].astype(np.int64)).to(dev)
    if bos is not None:
        batch[:, 0] = bos
    print(f"model: {label}; writer {writer}; erasers {', '.join(erasers)}; batch {tuple(batch.shape)}")
    want = set(ANALYSES[1:-1]) if args.analysis == "all" else {args.analysis}  # "all" = figures, not the miner
    md = [f"# The paper's analyses on {label}", ""]
    if note:
        md += [f"> {note}", ""]

    if want & {"fig1", "fig2"}:
        _figs12(paper, batch, writer, model, out, md)
    if "fig3" in want:
        _fig3(paper, model, batch, writer, erasers, out, md)
    if "fig4" in want:
        _fig4(paper, model, batch, writer, corpus, args, out, md)
    if "fig5" in want:
        _fig5(paper, model, batch, writer, erasers, out, md)
    if "fig8" in want:
        _fig8(paper, model, batch, writer, erasers, out, md)
    if "mine" in want:
        _mine(paper, model, writer, erasers, args, out, md)
    name = "paper_report.md" if args.analysis == "all" else f"paper_{args.analysis}.md"
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"\nwrote {out}/{name} and its figures")
    return 0


def _figs12(paper, batch, writer, model, out, md):
    resid, nodes = paper.fig1_fig2(batch, writer, model=model, out_dir=out)
    resid.to_csv(os.path.join(out, "fig1_resid_pr.csv"), index=False)
    nodes.to_csv(os.path.join(out, "fig2_node_pr.csv"), index=False)
    down = nodes[nodes.downstream].sort_values("median").head(6)
    md += ["## Fig. 1 / 2: residual stream and node PR onto " + writer, "",
           "![fig1](paper_fig1_resid_pr.png)", "![fig2](paper_fig2_node_pr.png)", "",
           "Strongest erasers: " + ", ".join(f"{r.node} ({r.median:+.3f})" for r in down.itertuples()), ""]


def _fig3(paper, model, batch, writer, erasers, out, md):
    t3 = paper.causal_check(model, batch, writer, erasers, out_path=os.path.join(out, "fig3_causal_check.png"))
    t3.to_csv(os.path.join(out, "fig3_causal_check.csv"), index=False)
    md += ["## Fig. 3: causal check (writer's clean output removed from the erasers' value input)", "",
           "![fig3](fig3_causal_check.png)", "", "| node | PR clean | PR patched |", "|---|---|---|"]
    md += [f"| {r.node} | {r.clean_median:+.3f} | {r.patched_median:+.3f} |" for r in t3.itertuples()] + [""]


def _fig4(paper, model, batch, writer, corpus, args, out, md):
    import pandas as pd

    from ..capture import model_device

    dev = model_device(model)
    d_vocab = model.cfg.d_vocab
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


def _fig5(paper, model, batch, writer, erasers, out, md):
    t5, fit = paper.v_composition(model, batch, writer, erasers, out_path=os.path.join(out, "fig5_v_composition.png"))
    _, fit_att = paper.v_composition(model, batch, writer, erasers, attention_aware=True,
                                     out_path=os.path.join(out, "fig5_v_composition_attention.png"))
    t5.to_csv(os.path.join(out, "fig5_v_composition.csv"), index=False)
    md += ["## Fig. 5: writer DLA vs V-composition DLA", "", "![fig5](fig5_v_composition.png) ![fig5a](fig5_v_composition_attention.png)", "",
           f"- same position (paper): slope {fit['slope']:.3f} ± {fit['slope_se']:.3f}, intercept {fit['intercept']:.4f} ± {fit['intercept_se']:.4f} (n={fit['n']})",
           f"- attention-aware: slope {fit_att['slope']:.3f} ± {fit_att['slope_se']:.3f}", "- published (GELU-4L, L0H2 vs L2H2-L2H7): slope -0.723 ± 0.013", ""]


def _fig8(paper, model, batch, writer, erasers, out, md):
    t8 = paper.bos_split(model, batch, writer, erasers, out_path=os.path.join(out, "fig8_bos_split.png"))
    t8.to_csv(os.path.join(out, "fig8_bos_split.csv"), index=False)
    md += ["## Fig. 8: erasure of the writer's BOS and non-BOS parts", "", "![fig8](fig8_bos_split.png)", "",
           f"Median over positions >= 1: PR onto BOS part {np.nanmedian(t8.pr_bos_median[1:]):+.3f}, onto the rest "
           f"{np.nanmedian(t8.pr_rest_median[1:]) if np.isfinite(t8.pr_rest_median[1:]).any() else float('nan'):+.3f}; "
           f"BOS share of |r_w|^2 {np.nanmedian(t8.bos_share_median[1:]):.3f}", ""]


def _mine(paper, model, writer, erasers, args, out, md):
    if not args.scan_dir:
        raise SystemExit("the miner needs --scan-dir (an erasure-fast scan output) and --corpus (the scanned corpus)")
    corpus = args.corpus if args.corpus != "demo" else _demo_rows(model)
    t = paper.mine_adversarial(model, args.scan_dir, corpus, writer=writer, erasers=erasers)
    t.to_csv(os.path.join(out, "adversarial_candidates.csv"), index=False)
    md += [f"## Candidate adversarial examples for DLA ({writer}): largest |DLA| - |adjusted DLA|", "",
           "| rank | row | pos | DLA | adjusted DLA | erasers' PR clean -> patched | context |", "|---|---|---|---|---|---|---|"]
    for r in t.itertuples():
        patch = f"{r.erasers_pr_clean:+.2f} -> {r.erasers_pr_patched:+.2f}" if "erasers_pr_clean" in t and np.isfinite(r.erasers_pr_clean) else ""
        md.append(f"| {r.rank} | {r.row} | {r.pos} | {r.dla:+.3f} | {r.adjusted_dla:+.3f} | {patch} | {str(r.context)[:60]} |")
    md.append("")


def _demo_rows(model):
    from ..demo import demo_corpus

    return demo_corpus(64, 1024, model.cfg.d_vocab)
