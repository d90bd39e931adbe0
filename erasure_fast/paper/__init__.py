"""The paper's analyses (Janiak et al., arXiv 2310.07325), one function each, each returning a tidy
pandas DataFrame and writing a PNG in the paper's style. Definitions: docs/math.md, "The paper's
experiments". Works on TransformerLens 4.x bridges and 3.x HookedTransformers.

Each analysis computes by default (``method="paper"``) what the authors' code computes
(canrager/cleanup_nodes, figure_recreation/fig*.py) and reports the authors' statistics (`stats`:
median = mean of the two middle values, band = 12.5-87.5 %); this project's variants are named options.
The authors loaded GELU-4L with ``HookedTransformer.from_pretrained``'s processing: load models with
``erasure_fast.load_model(..., processing="from_pretrained")`` to match (``erasure-fast paper`` does).

fig1_fig2         residual-stream PR and per-node PR onto a writer (from a scan or a batch)
causal_check      fig 3: remove the writer's clean output from the value input of every head of the
                  erasers' layer (ln1 scale frozen); method="erasers": the erasers' only
resample_ablation fig 4: a head's logit-difference DLA, clean vs its q/k/v input at the last position
                  taken from donor rows (`resampled_dla`: per donor; on the paper's prompts,
                  `paper_prompts`, when the model has GELU-4L's tokenizer); method="z_swap": the
                  head's hook_z swapped in from donor windows at every position
v_composition     fig 5: writer DLA vs the DLA of the erasers' OV image of the writer's output, positions
                  32 .. P-2, with a fit (start_pos=0: every position; attention_aware=True)
bos_split         fig 8: PR of every layer-2 head's sum onto the writer's BOS part and its remaining
                  part, each computed directly (`bos_split_values`: per token); method="erasers"
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

from .bos_split import bos_split, bos_split_values
from .causal import causal_check
from .common import ADVERSARIAL_PROMPTS, DEFAULT_ERASERS
from .support import check_paper_support, paper_support_problem
from .miner import mine_adversarial
from .resample import paper_prompts, paper_prompts_unavailable, plot_resample_ablation, resample_ablation, resampled_dla
from .residual import fig1_fig2
from .stats import CONVENTION, median_band
from .v_composition import linear_fit, v_composition

__all__ = [
    "ADVERSARIAL_PROMPTS", "CONVENTION", "DEFAULT_ERASERS", "bos_split", "bos_split_values", "causal_check",
    "check_paper_support", "fig1_fig2", "linear_fit", "median_band", "mine_adversarial", "paper_prompts",
    "paper_prompts_unavailable", "paper_support_problem", "plot_resample_ablation", "resample_ablation",
    "resampled_dla", "v_composition",
]
