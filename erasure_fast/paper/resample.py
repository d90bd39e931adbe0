"""Fig 4: a head's logit-difference DLA, clean vs with its input resampled from corpus windows."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..capture import model_device, validate_tokens
from ..models import model_spec
from ..plotting import new_figure, save
from .common import ADVERSARIAL_PROMPTS, attribute_with_hooks, head_indices


def resample_ablation(model, prompts: torch.Tensor, correct, incorrect, head: str, corpus: np.ndarray, *,
                      n_samples: int = 20, seed: int = 0, out_path: Optional[str] = None, labels=None):
    """Fig 4. ``prompts`` [B, P] (all the same length), ``correct`` / ``incorrect`` [B] token ids.
    For each prompt: the head's logit-difference DLA at the last position, clean, and with the head's
    input (``ln1.hook_normalized`` at that head) taken from ``n_samples`` random windows of ``corpus``
    (rows of token ids) of the same length, with the clean final-LN scale.
    Returns a DataFrame per prompt: clean DLA, resampled median / 25 % / 75 %."""
    import pandas as pd

    spec = model_spec(model)
    h = head_indices(model, [head])[0]
    layer, hh = divmod(h, spec.n_heads)
    dev = model_device(model)
    prompts = validate_tokens(prompts, spec).to(dev)
    B, P = prompts.shape
    correct = torch.as_tensor(correct, device=dev).reshape(B)
    incorrect = torch.as_tensor(incorrect, device=dev).reshape(B)
    tgt = torch.full((B, P), -1, dtype=torch.long, device=dev)
    bad = tgt.clone()
    tgt[:, -1], bad[:, -1] = correct, incorrect
    clean = attribute_with_hooks(model, prompts, [head], targets=tgt.clamp(min=0), incorrect=bad.clamp(min=0))
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
        kept = attribute_with_hooks(model, donor, [head], keep_hooks=qkv).extra

        def replacer(name):
            def replace(x, hook=None):
                x = x.clone()
                x[:, :, hh] = kept[name][:, :, hh].to(x)
                return x
            return replace

        res = attribute_with_hooks(model, prompts, [head], targets=tgt.clamp(min=0), incorrect=bad.clamp(min=0),
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
    n = len(table)
    fig, ax = new_figure((max(5, 1.6 * n), 3.6))
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
    return save(fig, path)


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
