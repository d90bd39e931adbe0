"""Fig 4: a head's logit-difference DLA, clean vs with its input resampled from corpus rows.

The authors (``figure_recreation/fig4_DLA_resample_ablation.py``) run with split q/k/v inputs and
replace, at the **last position only**, the head's ln1-normalised query, key and value input
(``blocks.l.ln1.hook_normalized[:, -1, head]``) by a donor's: the first P tokens of a corpus row (P
the prompt's length), one row per sample, every row of their corpus. Earlier positions keep their clean
input. The head's output at the last position is then read with the clean final-LN scale:
DLA = c(r) . (W_U[:, correct] - W_U[:, incorrect]) / s_clean; median and 12.5-87.5 % band over the
donors. ``method="paper"`` computes that; ``method="z_swap"`` is this project's variant: the head's whole
``hook_z`` swapped in from the donor run on random corpus windows, i.e. every position resampled (with
windows that do not start at BOS, positions the authors never touch change too).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..capture import model_device, run_until, validate_tokens
from ..models import as_transformer_lens, model_spec
from ..plotting import new_figure, save
from .common import ADVERSARIAL_PROMPTS, attribute_with_hooks, check_method, head_indices
from .stats import CONVENTION, band_row
from .support import check_paper_support

METHODS = {
    "paper": "the head's q/k/v input at the last position replaced by a donor's (the first P tokens of a corpus "
             "row); earlier positions clean",
    "z_swap": "the head's hook_z at every position swapped in from a donor run on a random corpus window",
}


def resampled_dla(model, prompts: torch.Tensor, correct, incorrect, head: str, corpus: np.ndarray, *,
                  method: str = "paper", n_samples: Optional[int] = None, seed: int = 0, capture: str = "auto"):
    """Fig 4's per-sample values: (clean DLA [B], resampled DLA [B, n_samples]), float64 on the CPU.

    ``prompts`` [B, P] (all the same length), ``correct`` / ``incorrect`` [B] token ids, ``corpus``
    rows of token ids [rows, >= P]. ``method`` (`METHODS`): "paper" -- the donors are the first P tokens
    of the first ``n_samples`` corpus rows (all rows by default), the same donors for every prompt, and
    each replaces the layer's input at the last position only (``blocks.l.hook_resid_pre[:, -1]``: the
    head's ln1-normalised input there -- for its query, key, value and any output gate -- becomes the
    donor's; only that head's output at the last position is read, and nothing else of that position
    reaches it, so this is the authors' per-head patch, in every layout);
    "z_swap" -- ``n_samples`` random windows of ``corpus`` (``seed``), the head's hook_z taken from the
    donor run at every position. Both use the clean final-LN scale. ``capture`` ("auto", "engine",
    "hooks", as in `erasure_fast.attribute`) is for the clean run and z_swap's donor runs; the runs
    that intervene use hooks."""
    model = as_transformer_lens(model)
    check_method(method, METHODS)
    spec = model_spec(model)
    h = head_indices(model, [head], "head")[0]
    check_paper_support(model, "fig4")
    layer, hh = divmod(h, spec.n_heads)
    dev = model_device(model)
    prompts = validate_tokens(prompts, spec).to(dev)
    B, P = prompts.shape
    corpus = np.asarray(corpus)
    if corpus.ndim != 2 or corpus.shape[0] < 1 or corpus.shape[1] < P:
        raise ValueError(f"corpus must be [rows >= 1, >= {P}] token ids, got shape {corpus.shape}")
    if n_samples is None:
        n_samples = corpus.shape[0]
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    if method == "paper" and n_samples > corpus.shape[0]:
        raise ValueError(f"n_samples {n_samples} exceeds the corpus's {corpus.shape[0]} rows (method 'paper' takes "
                         "one donor per row)")
    correct = torch.as_tensor(correct, device=dev).reshape(B)
    incorrect = torch.as_tensor(incorrect, device=dev).reshape(B)
    tgt = torch.full((B, P), -1, dtype=torch.long, device=dev)
    bad = tgt.clone()
    tgt[:, -1], bad[:, -1] = correct, incorrect
    clean = attribute_with_hooks(model, prompts, [head], targets=tgt.clamp(min=0), incorrect=bad.clamp(min=0),
                                 capture=capture)
    clean_dla = clean.dla[:, -1].reshape(B, -1)[:, h]
    if method == "paper":  # sample-major: donor i for every prompt
        draws = np.repeat(corpus[:n_samples, None, :P], B, axis=1)
    else:
        rng = np.random.default_rng(seed)
        draws = []  # [n_samples, B, P] donor windows, drawn sample by sample
        for _ in range(n_samples):
            rows = rng.integers(0, corpus.shape[0], size=B)
            starts = rng.integers(0, corpus.shape[1] - P + 1, size=B)
            draws.append(np.stack([corpus[r, s:s + P] for r, s in zip(rows, starts)]))
        draws = np.stack(draws)
    donors = torch.from_numpy(np.ascontiguousarray(draws).reshape(n_samples * B, P).astype(np.int64)).to(dev)
    chunk = max(1, _CHUNK_ROWS // B) * B  # whole samples per forward pass
    samples = []
    for lo in range(0, n_samples * B, chunk):
        donor = donors[lo:lo + chunk]
        reps = donor.shape[0] // B
        if method == "paper":
            hook = f"blocks.{layer}.hook_resid_pre"
            last = run_until(model, donor, [], (), hook)[hook][:, -1]  # the donors' layer input at the last position

            def replace(x, hook=None, last=last):
                x = x.clone()
                x[:, -1] = last.to(x)
                return x
        else:
            hook = f"blocks.{layer}.attn.hook_z"
            kept = attribute_with_hooks(model, donor, [head], capture=capture).z[:, :, h]  # the head's output on the donors

            def replace(z, hook=None, kept=kept):
                z = z.clone()
                z[:, :, hh] = kept.to(z)
                return z

        res = attribute_with_hooks(model, prompts.repeat(reps, 1), [head], targets=tgt.clamp(min=0).repeat(reps, 1),
                                   incorrect=bad.clamp(min=0).repeat(reps, 1), extra_hooks=[(hook, replace)],
                                   scale_override=clean.final_scale.repeat(reps, 1))
        samples.append(res.dla[:, -1].reshape(donor.shape[0], -1)[:, h].reshape(reps, B))
    return clean_dla.double().cpu(), torch.cat(samples, dim=0).t().double().cpu()


def resample_ablation(model, prompts: torch.Tensor, correct, incorrect, head: str, corpus: np.ndarray, *,
                      method: str = "paper", n_samples: Optional[int] = None, seed: int = 0,
                      out_path: Optional[str] = None, labels=None, capture: str = "auto"):
    """Fig 4 (`resampled_dla`: arguments, ``method``): per prompt, the head's logit-difference DLA at the
    last position, clean, and resampled -- median, q0.125, q0.875 over the donors
    (`erasure_fast.paper.stats`). Returns a DataFrame (prompt, clean_dla, resampled_median,
    resampled_q0.125, resampled_q0.875, n_samples); ``out_path`` also draws it."""
    import pandas as pd

    clean, samples = resampled_dla(model, prompts, correct, incorrect, head, corpus, method=method,
                                   n_samples=n_samples, seed=seed, capture=capture)
    labels = labels or [f"prompt {i}" for i in range(len(clean))]
    table = pd.DataFrame([dict(prompt=label, clean_dla=float(c), **band_row(s.numpy(), "resampled_"), n_samples=len(s))
                          for label, c, s in zip(labels, clean, samples)])
    table.attrs["statistics"] = CONVENTION
    if out_path:
        plot_resample_ablation(table, head, out_path)
    return table


_CHUNK_ROWS = 256  # donor rows (and repeated prompts) per forward pass


def plot_resample_ablation(table, head: str, path: str) -> str:
    """Fig 4 bars: clean DLA and resample-ablated median (12.5-87.5 % whiskers) per prompt."""
    n = len(table)
    fig, ax = new_figure((max(5, 1.6 * n), 3.6))
    x = np.arange(n)
    ax.bar(x - 0.2, table.clean_dla, width=0.4, label="clean DLA", color="tab:blue")
    ax.bar(x + 0.2, table.resampled_median, width=0.4, label="resample-ablated (median)", color="tab:orange")
    below = np.clip(table.resampled_median - table["resampled_q0.125"], 0, None)  # >= 0 even for a table made elsewhere
    above = np.clip(table["resampled_q0.875"] - table.resampled_median, 0, None)
    ax.errorbar(x + 0.2, table.resampled_median, yerr=[below, above], fmt="none", ecolor="black", lw=0.8, capsize=2)
    labels = [str(p).replace("\n", "\\n").replace("\t", "\\t")[:28] for p in table.prompt]  # one line each, no glyph-less tabs
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel(f"{head} logit-difference DLA")
    ax.set_title(f"{head}: DLA vs resample ablation of its input (clean final scale)", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)


def paper_prompts_unavailable(model) -> Optional[str]:
    """Why the paper's four prompts cannot run on ``model``, or None when they can. They need a
    tokenizer in which every answer (" bottom", " State", ...) is one token -- GELU-4L's; any other
    tokenizer splits some of them, and token ids must fit the model's vocabulary and context."""
    model = as_transformer_lens(model)
    if getattr(model, "tokenizer", None) is None:
        return "the model has no tokenizer"
    spec = model_spec(model)
    for text, *answers in ADVERSARIAL_PROMPTS:
        for answer in answers:
            n = model.to_tokens(answer, prepend_bos=False).shape[-1]
            if n != 1:
                return f"the answer {answer!r} is {n} tokens in this model's tokenizer, not one (the prompts are GELU-4L's)"
        ids = model.to_tokens(text)[0]
        if spec.n_ctx is not None and len(ids) > spec.n_ctx:
            return f"the prompt {text!r} is longer than the model's n_ctx {spec.n_ctx}"
        top = max(int(ids.max()), *(int(model.to_tokens(a, prepend_bos=False).max()) for a in answers))
        if top >= spec.d_vocab:
            return f"the tokenizer gives ids up to {top}, beyond the model's d_vocab {spec.d_vocab}"
    return None


def paper_prompts(model):
    """The paper's four adversarial prompts as (text, token ids [P], correct id, incorrect id), or None
    when the model cannot run them (no tokenizer, or not GELU-4L's; `paper_prompts_unavailable` says why)."""
    model = as_transformer_lens(model)
    if paper_prompts_unavailable(model) is not None:
        return None
    out = []
    for text, good, bad in ADVERSARIAL_PROMPTS:
        ids = model.to_tokens(text)[0]
        good_id, bad_id = (int(model.to_tokens(a, prepend_bos=False)[0, 0]) for a in (good, bad))
        out.append((text, ids, good_id, bad_id))
    return out
