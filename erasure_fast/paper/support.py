"""Which of the paper's analyses a model supports, decided from its structure before any forward pass
(`paper_support_problem`, `check_paper_support`); the per-family facts it reads are in
`erasure_fast.models.layout`."""

from __future__ import annotations

from typing import Optional

from ..models import UnsupportedModelError, as_transformer_lens, model_spec
from ..models.layout import HEAD_OUTPUT_NOT_PATTERN_TIMES_VALUES
from .common import eraser_layer, head_indices
from .value_path import value_path

ANALYSES = {  # name -> how messages call it
    "fig1": "fig 1 (residual-stream PR)", "fig2": "fig 2 (node PR)", "fig3": "fig 3 (causal check)",
    "fig4": "fig 4 (resample ablation)", "fig5": "fig 5 (V-composition)", "fig8": "fig 8 (BOS split)",
    "mine": "the miner's causal re-check (fig 3's patch)",
}


def paper_support_problem(model, analysis: str, writer=None, erasers=None) -> Optional[str]:
    """Why ``analysis`` (a key of `ANALYSES`) cannot run on ``model`` -- one line naming the family and
    its layout -- or None when it can. Reads the model's structure only (no forward pass). ``writer`` /
    ``erasers`` narrow the check to the layers they name (default: every layer)."""
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be one of {', '.join(ANALYSES)}, got {analysis!r}")
    model = as_transformer_lens(model)
    try:
        spec = model_spec(model)
    except UnsupportedModelError as e:
        return str(e)
    if analysis in ("fig1", "fig2", "fig4"):
        return None
    what = ANALYSES[analysis]
    mixes, step = HEAD_OUTPUT_NOT_PATTERN_TIMES_VALUES.get(spec.family, (False, None))
    if step is not None and (mixes or analysis == "fig5"):
        why = {"fig5": "its image of the writer, x W_V W_O, stands for a head's output only where that output is the "
                       "attention-weighted values times W_O",
               "fig8": "a head's output then depends on the other heads' values and does not split by key position"}.get(
            analysis, "one head's output then depends on every head's values, so patching the erasers' value input "
                      "moves the other heads too")
        return f"{spec.family}: {what} cannot run: {step}; {why}"
    if analysis in ("fig3", "fig5", "mine"):
        H = spec.n_heads
        if writer is not None and erasers is not None:
            pairs = [(head_indices(model, [writer], "writer")[0] // H, eraser_layer(model, writer, erasers))]
        else:
            pairs = [(l, l + 1) for l in range(spec.n_layers - 1)]
        try:
            for wl, el in pairs:
                value_path(model, wl, el)
        except UnsupportedModelError as e:
            return f"{spec.family}: {what} cannot run: {e}"
    return None


def check_paper_support(model, analysis: str, writer=None, erasers=None) -> None:
    """Raise `UnsupportedModelError` (a ValueError) with `paper_support_problem`'s one line when
    ``analysis`` cannot run on ``model``; called by each analysis before its first forward pass."""
    problem = paper_support_problem(model, analysis, writer, erasers)
    if problem is not None:
        raise UnsupportedModelError(problem)


