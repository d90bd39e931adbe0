"""The paper's analyses (Janiak et al., arXiv 2310.07325), one function each, each returning a tidy
pandas DataFrame and writing a PNG in the paper's style. See shared/erasure-math.md, "The paper's
experiments". Works on TransformerLens 4.x bridges and 3.x HookedTransformers.

fig1_fig2         residual-stream PR and per-node PR onto a writer (from a scan or a batch)
causal_check      fig 3: remove the writer's clean output from the erasers' value input (ln1 scale frozen)
resample_ablation fig 4: a head's logit-difference DLA, clean vs its input resampled from corpus prompts
v_composition     fig 5: writer DLA vs the DLA of the erasers' OV image of the writer's output (+ fit)
bos_split         fig 8: PR of the erasers' sum onto the writer's BOS part and its remaining part
mine_adversarial  positions where |DLA_w| - |adjusted DLA_w| is largest, re-checked with the patch
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from .attribution import _resolve_writers, _target_ids, run_attribution
from .backends import get_backend
from .capture import model_device, validate_tokens
from .models import model_spec

ADVERSARIAL_PROMPTS = [
    ("It's in the cupboard, either on the top or on the", " bottom", " top"),
    ("I went to university at Michigan", " State", " University"),
    ("class MyClass:\n\tdef", " __", " get"),
    ("The church I go to is the Seventh-day Adventist", " Church", " church"),
]
DEFAULT_ERASERS = ("L2H2", "L2H3", "L2H4", "L2H5", "L2H6", "L2H7")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heads(model, heads) -> List[int]:
    return _resolve_writers(list(heads) if not isinstance(heads, str) else [heads], model_spec(model)).tolist()


def _attr(model, tokens, writers, *, targets="next", incorrect=None, backend="auto", **kw):
    spec = model_spec(model)
    tokens = validate_tokens(tokens, spec)
    wr = _resolve_writers(writers, spec)
    ids = _target_ids(targets, tokens, spec, "targets", allow_next=True)
    inc = None if incorrect is None else torch.where(ids < 0, ids, _target_ids(incorrect, tokens, spec, "incorrect", False))
    return run_attribution(model, spec, tokens.to(model_device(model)), wr, ids, inc, include_mlps=True,
                           impl=get_backend(backend, model_device(model), spec.W_O.dtype), **kw)


def _ln_weight(model, layer: int, which: str = "ln1") -> Optional[torch.Tensor]:
    """The LayerNorm weight gamma of blocks[layer].<which>, or None (folded / LNPre / absent)."""
    ln = getattr(model.blocks[layer], which)
    for attr in ("w", "weight"):
        if hasattr(ln, attr) and isinstance(getattr(ln, attr), torch.Tensor):
            return getattr(ln, attr).detach()
    inner = getattr(ln, "_original_component", None)
    if inner is not None and getattr(inner, "weight", None) is not None:
        return inner.weight.detach()
    return None


def _center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-1, keepdim=True)


def _save(fig, path: Optional[str]) -> Optional[str]:
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


# -- figs 1 and 2 -----------------------------------------------------------------------------------
def fig1_fig2(source, writer: str = "L0H2", *, model=None, out_dir: Optional[str] = None):
    """Residual PR (fig 1) and downstream-node PR (fig 2) onto ``writer``.

    ``source``: a ScanResult, a scan output directory (summary.parquet), or a token batch [B, P]
    (then ``model`` is needed). Returns (resid_table, node_table) DataFrames."""
    import pandas as pd

    from .scan.plots import fig1_resid, fig2_nodes

    if isinstance(source, torch.Tensor):
        res = _attr(model, source, [writer])
        rows = []
        rpr = res.resid_pr.reshape(-1, *res.resid_pr.shape[2:])[..., 0].double().cpu().numpy()
        for i, lab in enumerate(res.resid_labels):
            v = rpr[:, i][np.isfinite(rpr[:, i])]
            rows.append(dict(kind="resid", node=lab, writer=writer, downstream=False, median=np.median(v),
                             **{"q0.25": np.quantile(v, 0.25), "q0.75": np.quantile(v, 0.75)}))
        pr = res.pr.reshape(-1, *res.pr.shape[2:])[..., 0].double().cpu().numpy()
        down = res.downstream[:, 0].cpu().numpy()
        for i, lab in enumerate(res.node_labels):
            v = pr[:, i][np.isfinite(pr[:, i])]
            rows.append(dict(kind="node", node=lab, writer=writer, downstream=bool(down[i]), median=np.median(v),
                             **{"q0.25": np.quantile(v, 0.25), "q0.75": np.quantile(v, 0.75)}))
        summary = pd.DataFrame(rows)
        resid_labels = res.resid_labels
    else:
        if isinstance(source, (str, os.PathLike)):
            summary = pd.read_parquet(os.path.join(source, "summary.parquet"))
        else:
            summary = source.summary
        resid_labels = summary[(summary.kind == "resid") & (summary.writer == writer)].node.tolist()
    if not (summary.writer == writer).any():
        raise ValueError(f"writer {writer!r} is not in the source (writers: {sorted(set(summary.writer.dropna()))})")

    class _Cfg:  # the two plot helpers only need the resid labels
        pass

    cfg = _Cfg()
    cfg.resid_labels = resid_labels
    resid = summary[(summary.kind == "resid") & (summary.writer == writer)].reset_index(drop=True)
    nodes = summary[(summary.kind == "node") & (summary.writer == writer)].reset_index(drop=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        fig1_resid(summary, cfg, [writer], os.path.join(out_dir, "paper_fig1_resid_pr.png"))
        fig2_nodes(summary, cfg, writer, os.path.join(out_dir, "paper_fig2_node_pr.png"))
    return resid[["node", "median", "q0.25", "q0.75"]], nodes[["node", "downstream", "median", "q0.25", "q0.75"]]


# -- fig 3: causal check ----------------------------------------------------------------------------
def _value_patch(model, spec, clean, writer: int, erasers: Sequence[int], layer: int, clean_ln1_scale: torch.Tensor):
    """Hook on blocks.{layer}.attn.hook_v removing the writer's clean output from the value input of
    ``erasers`` with the layer's ln1 scale frozen to the clean run. With the scale frozen the patch is
    linear: v_e[s] -= (c(r_w[s]) / s_clean[s] * gamma) W_V[e] (queries and keys are untouched)."""
    H = spec.n_heads
    z_w = clean.z[:, :, writer].to(spec.W_O.dtype)  # [B, P, dh]
    r_w = z_w @ spec.W_O[writer].to(z_w)  # [B, P, D]
    x = _center(r_w) / clean_ln1_scale.to(r_w)[..., None]
    gamma = _ln_weight(model, layer, "ln1")
    if gamma is not None:
        x = x * gamma.to(x)
    W_V = model.W_V.detach()[layer]  # [H, D, dh]
    heads = [e - layer * H for e in erasers]
    delta = torch.einsum("bpd,hdk->bphk", x, W_V[heads].to(x))  # [B, P, len(heads), dh]

    def hook(v, hook=None):
        v = v.clone()
        v[:, :, heads] -= delta.to(v)
        return v

    return (f"blocks.{layer}.attn.hook_v", hook)


def causal_check(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS,
                 *, out_path: Optional[str] = None, backend: str = "auto"):
    """Fig 3. Returns a DataFrame: node (erasers and resid points), PR onto the writer clean and patched
    (median, 25 %, 75 %)."""
    import pandas as pd

    spec = model_spec(model)
    w = _heads(model, [writer])[0]
    es = _heads(model, erasers)
    layers = {e // spec.n_heads for e in es}
    if len(layers) != 1:
        raise ValueError(f"erasers must share one layer (the patched value input), got {list(erasers)}")
    layer = layers.pop()
    if layer <= w // spec.n_heads:
        raise ValueError(f"erasers must come after the writer's layer {w // spec.n_heads}, got layer {layer}")
    scale_hook = f"blocks.{layer}.ln1.hook_scale"
    clean = _attr(model, tokens, [writer], backend=backend, keep_hooks=(scale_hook,))
    ln1_scale = clean.extra[scale_hook].reshape(clean.z.shape[:2])
    patch = _value_patch(model, spec, clean, w, es, layer, ln1_scale)
    patched = _attr(model, tokens, [writer], backend=backend, extra_hooks=[patch])
    rows = []
    for label, a, b in [(spec.head_label(e), clean.pr[..., e, 0], patched.pr[..., e, 0]) for e in es] + \
            [(lab, clean.resid_pr[..., i, 0], patched.resid_pr[..., i, 0]) for i, lab in enumerate(clean.resid_labels)]:
        row = dict(node=label)
        for tag, t in (("clean", a), ("patched", b)):
            v = t.reshape(-1).double().cpu()
            v = v[~torch.isnan(v)]
            row.update({f"{tag}_median": float(v.median()), f"{tag}_q25": float(v.quantile(0.25)), f"{tag}_q75": float(v.quantile(0.75))})
        rows.append(row)
    table = pd.DataFrame(rows)
    if out_path:
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        er = table[table.node.isin([spec.head_label(e) for e in es])]
        x = np.arange(len(er))
        for off, tag, color in ((-0.2, "clean", "tab:red"), (0.2, "patched", "tab:green")):
            axes[0].bar(x + off, er[f"{tag}_median"], width=0.4, color=color, label=tag)
        axes[0].set_xticks(x, er.node)
        axes[0].axhline(0, color="grey", lw=0.8)
        axes[0].set_ylabel(f"PR onto {writer}")
        axes[0].set_title("Erasers (median)", fontsize=9)
        axes[0].legend(fontsize=8)
        rs = table[~table.node.isin(er.node)]
        xr = np.arange(len(rs))
        for tag, color in (("clean", "tab:red"), ("patched", "tab:green")):
            axes[1].plot(xr, rs[f"{tag}_median"], marker="o", color=color, label=tag)
            axes[1].fill_between(xr, rs[f"{tag}_q25"], rs[f"{tag}_q75"], color=color, alpha=0.15)
        axes[1].set_xticks(xr, rs.node, rotation=45, ha="right")
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_title(f"Residual stream PR onto {writer}", fontsize=9)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Causal check: {writer}'s clean output removed from layer-{layer} value input (ln1 scale frozen)", fontsize=10)
        _save(fig, out_path)
    return table


# -- fig 4: DLA vs resample ablation ----------------------------------------------------------------
def resample_ablation(model, prompts: torch.Tensor, correct, incorrect, head: str, corpus: np.ndarray, *,
                      n_samples: int = 20, seed: int = 0, out_path: Optional[str] = None, labels=None):
    """Fig 4. ``prompts`` [B, P] (all the same length), ``correct`` / ``incorrect`` [B] token ids.
    For each prompt: the head's logit-difference DLA at the last position, clean, and with the head's
    input (``ln1.hook_normalized`` at that head) taken from ``n_samples`` random windows of ``corpus``
    (rows of token ids) of the same length, with the clean final-LN scale.
    Returns a DataFrame per prompt: clean DLA, resampled median / 25 % / 75 %."""
    import pandas as pd

    spec = model_spec(model)
    h = _heads(model, [head])[0]
    layer, hh = divmod(h, spec.n_heads)
    dev = model_device(model)
    prompts = validate_tokens(prompts, spec).to(dev)
    B, P = prompts.shape
    correct = torch.as_tensor(correct, device=dev).reshape(B)
    incorrect = torch.as_tensor(incorrect, device=dev).reshape(B)
    tgt = torch.full((B, P), -1, dtype=torch.long, device=dev)
    bad = tgt.clone()
    tgt[:, -1], bad[:, -1] = correct, incorrect
    clean = _attr(model, prompts, [head], targets=tgt.clamp(min=0), incorrect=bad.clamp(min=0))
    clean_dla = clean.dla[:, -1].reshape(B, -1)[:, h]
    rng = np.random.default_rng(seed)
    corpus = np.asarray(corpus)
    if corpus.ndim != 2 or corpus.shape[1] < P:
        raise ValueError(f"corpus must be [rows, >= {P}] token ids, got shape {corpus.shape}")
    # The head's q, k, v are functions of its input alone, so swapping in the donor's q, k, v at this
    # head is exactly resampling the head's (normalised) input; no split-QKV mode needed.
    qkv = [f"blocks.{layer}.attn.hook_{kind}" for kind in ("q", "k", "v")]
    samples = []
    for _ in range(n_samples):
        rows = rng.integers(0, corpus.shape[0], size=B)
        starts = rng.integers(0, corpus.shape[1] - P + 1, size=B)
        donor = torch.from_numpy(np.stack([corpus[r, s:s + P] for r, s in zip(rows, starts)])).long().to(dev)
        kept = _attr(model, donor, [head], keep_hooks=qkv).extra

        def replacer(name):
            def replace(x, hook=None):
                x = x.clone()
                x[:, :, hh] = kept[name][:, :, hh].to(x)
                return x
            return replace

        res = _attr(model, prompts, [head], targets=tgt.clamp(min=0), incorrect=bad.clamp(min=0),
                    extra_hooks=[(name, replacer(name)) for name in qkv], scale_override=clean.final_scale)
        samples.append(res.dla[:, -1].reshape(B, -1)[:, h])
    s = torch.stack(samples, dim=1).double().cpu()  # [B, n_samples]
    labels = labels or [f"prompt {i}" for i in range(B)]
    table = pd.DataFrame(dict(prompt=labels, clean_dla=clean_dla.double().cpu().numpy(),
                              resampled_median=s.median(dim=1).values.numpy(), resampled_q25=s.quantile(0.25, dim=1).numpy(),
                              resampled_q75=s.quantile(0.75, dim=1).numpy()))
    if out_path:
        plot_resample_ablation(table, head, out_path)
    return table


def plot_resample_ablation(table, head: str, path: str) -> str:
    """Fig 4 bars: clean DLA and resample-ablated median (25-75 % whiskers) per prompt."""
    plt = _plt()
    n = len(table)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * n), 3.6))
    x = np.arange(n)
    ax.bar(x - 0.2, table.clean_dla, width=0.4, label="clean DLA", color="tab:blue")
    ax.bar(x + 0.2, table.resampled_median, width=0.4, label="resample-ablated (median)", color="tab:orange")
    ax.errorbar(x + 0.2, table.resampled_median, yerr=[table.resampled_median - table.resampled_q25,
                table.resampled_q75 - table.resampled_median], fmt="none", ecolor="black", lw=0.8, capsize=2)
    ax.set_xticks(x, [str(p)[:28] for p in table.prompt], rotation=20, ha="right", fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel(f"{head} logit-difference DLA")
    ax.set_title(f"{head}: DLA vs resample ablation of its input (clean final scale)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def paper_prompts(model):
    """The paper's four adversarial prompts as (text, token ids [P], correct id, incorrect id), or None
    when the model has no tokenizer."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    out = []
    for text, good, bad in ADVERSARIAL_PROMPTS:
        ids = model.to_tokens(text)[0]
        out.append((text, ids, model.to_single_token(good), model.to_single_token(bad)))
    return out


# -- fig 5: V-composition ---------------------------------------------------------------------------
def v_composition(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
                  out_path: Optional[str] = None, attention_aware: bool = False):
    """Fig 5. Per token: the writer's next-token DLA and the DLA of the erasers' OV image of the
    writer's LN-normalised output, sum_e (c(r_w)/s_ln1 * gamma) W_V[e] W_O[e] (paper: attention
    ignored, same position); with ``attention_aware`` the image is mixed by each eraser's real
    attention pattern. Returns (DataFrame of points, fit dict: slope, intercept, their standard errors)."""
    import pandas as pd

    spec = model_spec(model)
    w = _heads(model, [writer])[0]
    es = _heads(model, erasers)
    layer = es[0] // spec.n_heads
    if any(e // spec.n_heads != layer for e in es):
        raise ValueError("erasers must share one layer")
    keep = (f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.attn.hook_pattern")
    res = _attr(model, tokens, [writer], keep_hooks=keep)
    B, P = res.z.shape[:2]
    r_w = res.z[:, :, w].to(spec.W_O) @ spec.W_O[w]  # [B, P, D]
    x = _center(r_w) / res.extra[keep[0]].reshape(B, P, 1).to(r_w)
    gamma = _ln_weight(model, layer, "ln1")
    if gamma is not None:
        x = x * gamma.to(x)
    W_V = model.W_V.detach()[layer].to(x)
    W_O = model.W_O.detach()[layer].to(x)
    heads = [e - layer * spec.n_heads for e in es]
    if attention_aware:
        A = res.extra[keep[1]].to(x)[:, heads]  # [B, E, P, P]
        per_head = torch.einsum("bpd,edk,ekm->bepm", x, W_V[heads], W_O[heads])  # [B, E, P, D]
        img = torch.einsum("beqp,bepm->bqm", A, per_head)
    else:
        img = torch.einsum("bpd,edk,ekm->bpm", x, W_V[heads], W_O[heads])
    ids = torch.full((B, P), -1, dtype=torch.long, device=r_w.device)
    tokens = validate_tokens(tokens, spec).to(r_w.device)
    ids[:, :-1] = tokens[:, 1:]
    d = spec.directions.to(r_w)[ids[:, :-1].clamp(min=0)]  # [B, P-1, D]
    if spec.center:
        d = _center(d)
    s = res.final_scale[:, :-1].to(r_w)
    comp = (img[:, :-1] * d).sum(-1) / s
    wdla = res.writer_dla[:, :-1, 0].to(r_w)
    table = pd.DataFrame(dict(writer_dla=wdla.reshape(-1).double().cpu().numpy(),
                              v_composition_dla=comp.reshape(-1).double().cpu().numpy()))
    fit = linear_fit(table.writer_dla.to_numpy(), table.v_composition_dla.to_numpy())
    if out_path:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ax.scatter(table.writer_dla, table.v_composition_dla, s=3, alpha=0.3)
        xs = np.linspace(table.writer_dla.min(), table.writer_dla.max(), 10)
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, color="tab:red",
                label=f"slope {fit['slope']:.3f} ± {fit['slope_se']:.3f}")
        ax.set_xlabel(f"{writer} DLA")
        ax.set_ylabel("V-composition DLA" + (" (attention-aware)" if attention_aware else " (same position)"))
        ax.legend(fontsize=8)
        ax.set_title(f"{writer} vs erasers' OV image", fontsize=9)
        _save(fig, out_path)
    return table, fit


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least squares y = a + b x with standard errors of a and b."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3:
        raise ValueError(f"need at least 3 finite points for a fit, got {n}")
    X = np.stack([np.ones(n), x], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    sigma2 = resid @ resid / (n - 2)
    cov = sigma2 * np.linalg.inv(X.T @ X)
    return dict(intercept=float(coef[0]), slope=float(coef[1]), intercept_se=float(np.sqrt(cov[0, 0])),
                slope_se=float(np.sqrt(cov[1, 1])), n=int(n))


# -- fig 8: BOS split -------------------------------------------------------------------------------
def bos_split(model, tokens: torch.Tensor, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS, *,
              out_path: Optional[str] = None):
    """Fig 8. The writer's output split into its BOS part (attention to position 0) and the rest;
    PR of the erasers' summed output onto each part, by position. Returns a DataFrame per position:
    median PR onto the BOS part and onto the rest, and the BOS part's share of |r_w|^2."""
    import pandas as pd

    spec = model_spec(model)
    w = _heads(model, [writer])[0]
    wl, wh = divmod(w, spec.n_heads)
    es = _heads(model, erasers)
    keep = (f"blocks.{wl}.attn.hook_pattern", f"blocks.{wl}.attn.hook_v")
    res = _attr(model, tokens, [writer], keep_hooks=keep)
    A = res.extra[keep[0]][:, wh].to(spec.W_O)  # [B, Pq, Pk]
    v = res.extra[keep[1]][:, :, wh].to(spec.W_O)  # [B, Pk, dh]
    W_O = spec.W_O[w]
    z_bos = A[:, :, :1] * v[:, None, 0]  # [B, Pq, dh]
    r_bos = z_bos @ W_O
    r_all = res.z[:, :, w].to(W_O) @ W_O
    r_rest = r_all - r_bos
    r_erase = sum(res.z[:, :, e].to(W_O) @ spec.W_O[e] for e in es)

    def pr(a, b):
        bb = (b * b).sum(-1)
        return torch.where(bb == 0, torch.full_like(bb, float("nan")), (a * b).sum(-1) / bb)

    pr_bos, pr_rest = pr(r_erase, r_bos), pr(r_erase, r_rest)
    share = (r_bos * r_all).sum(-1) / (r_all * r_all).sum(-1)
    table = pd.DataFrame(dict(position=np.arange(A.shape[1]),
                              pr_bos_median=pr_bos.double().nanmedian(0).values.cpu().numpy(),
                              pr_rest_median=pr_rest.double().nanmedian(0).values.cpu().numpy(),
                              bos_share_median=share.double().nanmedian(0).values.cpu().numpy()))
    if out_path:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(table.position, table.pr_bos_median, label=f"onto {writer}'s BOS part")
        ax.plot(table.position, table.pr_rest_median, label=f"onto {writer}'s non-BOS part")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("position")
        ax.set_ylabel("PR of erasers' sum (median)")
        ax.set_title(f"Erasure of {writer}'s BOS and non-BOS parts", fontsize=9)
        ax.legend(fontsize=8)
        _save(fig, out_path)
    return table


# -- erasure-adjusted DLA miner ---------------------------------------------------------------------
def mine_adversarial(model, scan_result, corpus, *, writer: str = "L0H2", erasers: Sequence[str] = DEFAULT_ERASERS,
                     top: int = 10, context: int = 12, recheck: int = 3):
    """Rank the scan's candidate positions by |DLA_w| - |adjusted DLA_w| (from its top-k), show their
    context (decoded with the model's tokenizer when it has one), and re-check the best ``recheck``
    with the causal patch (the erasers' PR onto the writer before / after). ``scan_result``: a
    ScanResult or scan output directory whose focus writer is ``writer``; ``corpus``: the scanned
    corpus. Returns a DataFrame."""
    import pandas as pd

    from .scan import open_corpus

    import json

    path = scan_result if isinstance(scan_result, (str, os.PathLike)) else scan_result.out_dir
    data = json.load(open(os.path.join(path, "summary.json")))
    if data["focus_writer"] != writer:
        raise ValueError(f"the scan's top examples are for {data['focus_writer']}, not {writer}; scan with writers=[{writer!r}]")
    tops = data["top_examples"]["dla_minus_adjusted"]
    bos = data["meta"].get("prepend_bos")
    c = open_corpus(corpus, seq_len=data["meta"]["seq_len"])
    rows_needed = sorted({e["row"] for e in tops[:top]})
    rows = {}
    for i, r in c.rows(min(rows_needed) if rows_needed else 0):
        if i in rows_needed:
            rows[i] = r if bos is None else np.concatenate([[bos], r[:-1]])  # as the scan saw it
        if len(rows) == len(rows_needed):
            break
    tok = getattr(model, "tokenizer", None)
    out = []
    for rank, e in enumerate(tops[:top]):
        ctx = rows[e["row"]][max(0, e["pos"] - context + 1): e["pos"] + 2]
        text = tok.decode(ctx[:-1]) + " ⟶ " + tok.decode(ctx[-1:]) if tok is not None else " ".join(map(str, ctx.tolist()))
        item = dict(rank=rank, row=e["row"], pos=e["pos"], dla=e["dla"], adjusted_dla=e["adjusted_dla"],
                    gap=abs(e["dla"]) - abs(e["adjusted_dla"]), context=text)
        if rank < recheck:
            window = torch.from_numpy(rows[e["row"]][: e["pos"] + 2].astype(np.int64))[None]
            t = causal_check(model, window, writer, erasers)
            er = t[t.node.isin(list(erasers))]
            item.update(erasers_pr_clean=float(er.clean_median.sum()), erasers_pr_patched=float(er.patched_median.sum()))
        out.append(item)
    return pd.DataFrame(out)
