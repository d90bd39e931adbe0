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

Block layouts other than GPT-2's (docs/math.md): the norms between a writer and the erasers' value
input are taken as the model computes them, with their scales frozen (RMSNorm: no centring; Gemma's and
LayerNorm1P's 1 + w weights; post-norms on the attention output; no pre-norm), grouped-query attention
is patched per query head, and Granite / Falcon-H1 multipliers are applied. What a layout cannot give
is refused before any forward pass with `erasure_fast.UnsupportedModelError` naming the family and why
(`paper_support_problem` says it without raising): figs 3, 5 and 8 where one head's output depends on
the other heads' values (BitNet's norm across heads), fig 5 where a head's output is not its
attention-weighted values times W_O (output gates: AFMoE, Laguna).

``erasure-fast paper`` (`erasure_fast.paper.cli`) checks a whole job up front, then runs the analyses
on one model and writes a report.
"""

from .bos_split import bos_split
from .causal import causal_check
from .common import ADVERSARIAL_PROMPTS, DEFAULT_ERASERS
from .support import check_paper_support, paper_support_problem
from .miner import mine_adversarial
from .resample import paper_prompts, paper_prompts_unavailable, plot_resample_ablation, resample_ablation
from .residual import fig1_fig2
from .v_composition import linear_fit, v_composition

__all__ = [
    "ADVERSARIAL_PROMPTS", "DEFAULT_ERASERS", "bos_split", "causal_check", "check_paper_support", "fig1_fig2", "linear_fit",
    "mine_adversarial", "paper_prompts", "paper_prompts_unavailable", "paper_support_problem", "plot_resample_ablation",
    "resample_ablation", "v_composition",
]
