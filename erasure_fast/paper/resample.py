"""Fig 4: a head's logit-difference DLA, clean vs with its input resampled from corpus windows."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..capture import model_device, validate_tokens
from ..models import as_transformer_lens, model_spec
from ..plotting import new_figure, save
from .common import ADVERSARIAL_PROMPTS, attribute_with_hooks, head_indices
from .support import check_paper_support


def resample_ablation(model, prompts: torch.Tensor, correct, incorrect, head: str, corpus: np.ndarray, *,
                      n_samples: int = 20, seed: int = 0, out_path: Optional[str] = None, labels=None,
                      capture: str = "auto"):
    """Fig 4. ``prompts`` [B, P] (all the same length), ``correct`` / ``incorrect`` [B] token ids.
    For each prompt: the head's logit-difference DLA at the last position, clean, and with the head's
    input (``ln1.hook_normalized`` at that head) taken from ``n_samples`` random windows of ``corpus``
    (rows of token ids) of the same length, with the clean final-LN scale.
    Returns a DataFrame per prompt: clean DLA, resampled median / 25 % / 75 %.

    A head's output is a function of its input alone, so resampling its input is putting in the output
    (hook_z) the head has on the donor window: exact in every layout -- grouped-query attention (whose
    keys and values are shared with other query heads), output gates, q/k norms over all heads (OLMo 2:
    the donor's whole layer input is what that norm sees) -- with no split-QKV mode needed.
    ``capture`` ("auto", "engine", "hooks", as in `erasure_fast.attribute`) is for the clean and the
    donor runs; the resampled runs put the donors' z in through a hook, so they run on hooks."""
    model = as_transformer_lens(model)
    import pandas as pd

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
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    correct = torch.as_tensor(correct, device=dev).reshape(B)
    incorrect = torch.as_tensor(incorrect, device=dev).reshape(B)
    tgt = torch.full((B, P), -1, dtype=torch.long, device=dev)
    bad = tgt.clone()
    tgt[:, -1], bad[:, -1] = correct, incorrect
    clean = attribute_with_hooks(model, prompts, [head], targets=tgt.clamp(min=0), incorrect=bad.clamp(min=0),
                                 capture=capture)
    clean_dla = clean.dla[:, -1].reshape(B, -1)[:, h]
    rng = np.random.default_rng(seed)
    draws = []  # [n_samples, B, P] donor windows, drawn sample by sample
    for _ in range(n_samples):
        rows = rng.integers(0, corpus.shape[0], size=B)
        starts = rng.integers(0, corpus.shape[1] - P + 1, size=B)
        draws.append(np.stack([corpus[r, s:s + P] for r, s in zip(rows, starts)]))
    donors = torch.from_numpy(np.stack(draws).reshape(n_samples * B, P)).long().to(dev)
    hook_z = f"blocks.{layer}.attn.hook_z"
    chunk = max(1, _CHUNK_ROWS // B) * B  # whole samples per forward pass
    samples = []
    for lo in range(0, n_samples * B, chunk):
        donor = donors[lo:lo + chunk]
        n = donor.shape[0]
        kept = attribute_with_hooks(model, donor, [head], capture=capture).z[:, :, h]  # the head's output on the donors

        def replace(z, hook=None, kept=kept):
            z = z.clone()
            z[:, :, hh] = kept.to(z)
            return z

        reps = n // B
        res = attribute_with_hooks(model, prompts.repeat(reps, 1), [head], targets=tgt.clamp(min=0).repeat(reps, 1),
                                   incorrect=bad.clamp(min=0).repeat(reps, 1), extra_hooks=[(hook_z, replace)],
                                   scale_override=clean.final_scale.repeat(reps, 1))
        samples.append(res.dla[:, -1].reshape(n, -1)[:, h].reshape(reps, B))
    s = torch.cat(samples, dim=0).t().double().cpu()  # [B, n_samples]
    labels = labels or [f"prompt {i}" for i in range(B)]
    table = pd.DataFrame(dict(prompt=labels, clean_dla=clean_dla.double().cpu().numpy(),
                              # quantile(0.5), not median(): torch's median of an even count is the lower
                              # middle value, which can fall below the interpolated 25 % quantile
                              resampled_median=s.quantile(0.5, dim=1).numpy(), resampled_q25=s.quantile(0.25, dim=1).numpy(),
                              resampled_q75=s.quantile(0.75, dim=1).numpy()))
    if out_path:
        plot_resample_ablation(table, head, out_path)
    return table


_CHUNK_ROWS = 256  # donor rows (and repeated prompts) per forward pass


def plot_resample_ablation(table, head: str, path: str) -> str:
    """Fig 4 bars: clean DLA and resample-ablated median (25-75 % whiskers) per prompt."""
    n = len(table)
    fig, ax = new_figure((max(5, 1.6 * n), 3.6))
    x = np.arange(n)
    ax.bar(x - 0.2, table.clean_dla, width=0.4, label="clean DLA", color="tab:blue")
    ax.bar(x + 0.2, table.resampled_median, width=0.4, label="resample-ablated (median)", color="tab:orange")
    below = np.clip(table.resampled_median - table.resampled_q25, 0, None)  # >= 0 even for a table made elsewhere
    above = np.clip(table.resampled_q75 - table.resampled_median, 0, None)
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
