"""The paper's analyses (Janiak et al., arXiv 2310.07325), one function each, each returning a tidy
pandas DataFrame and writing a PNG in the paper's style. Definitions: docs/math.md, "The paper's
experiments". Works on TransformerLens 4.x bridges and 3.x HookedTransformers.

fig1_fig2         residual-stream PR and per-node PR onto a writer (from a scan or a batch)
causal_check      fig 3: remove the writer's clean output from the erasers' value input (ln1 scale frozen)
resample_ablation fig 4: a head's logit-difference DLA, clean vs its input resampled from corpus prompts
                  (on the paper's prompts, `paper_prompts`, when the model has GELU-4L's tokenizer)
v_composition     fig 5: writer DLA vs the DLA of the erasers' OV image of the writer's output (+ fit)
bos_split         fig 8: PR of the erasers' sum onto the writer's BOS part and its remaining part
mine_adversarial  positions where |DLA_w| - |adjusted DLA_w| is largest, re-checked with the patch

``erasure-fast paper`` (`erasure_fast.paper.cli`) checks a whole job up front, then runs the analyses
on one model and writes a report.
"""

from .bos_split import bos_split
from .causal import causal_check
from .common import ADVERSARIAL_PROMPTS, DEFAULT_ERASERS
from .miner import mine_adversarial
from .resample import paper_prompts, paper_prompts_unavailable, plot_resample_ablation, resample_ablation
from .residual import fig1_fig2
from .v_composition import linear_fit, v_composition

__all__ = [
    "ADVERSARIAL_PROMPTS", "DEFAULT_ERASERS", "bos_split", "causal_check", "fig1_fig2", "linear_fit",
    "mine_adversarial", "paper_prompts", "paper_prompts_unavailable", "plot_resample_ablation", "resample_ablation", "v_composition",
]
