"""What the paper's analyses share: defaults, head parsing and checks, attribution with hooks. Which
analyses a model supports is in `support`, how a writer's output reaches a later layer's value input in
`value_path`."""

from __future__ import annotations

from typing import List

import torch

from ..attribution import resolve_capture, resolve_writers, run_attribution, target_ids
from ..backends import get_backend
from ..capture import model_device, validate_tokens
from ..models import as_transformer_lens, model_spec

ADVERSARIAL_PROMPTS = [
    ("It's in the cupboard, either on the top or on the", " bottom", " top"),
    ("I went to university at Michigan", " State", " University"),
    ("class MyClass:\n\tdef", " __", " get"),
    ("The church I go to is the Seventh-day Adventist", " Church", " church"),
]
DEFAULT_ERASERS = ("L2H2", "L2H3", "L2H4", "L2H5", "L2H6", "L2H7")
# Fig 4b: the head the authors resample on each adversarial prompt (one with a large DLA there)
FIG4B_HEADS = ("L3H1", "L2H1", "L3H5", "L2H2")


def check_method(method, methods: dict) -> str:
    """``method`` when it is a key of ``methods`` (an analysis's {method: what it does}), else a
    ValueError naming them; "paper" is always the authors' computation."""
    if not isinstance(method, str) or method not in methods:
        raise ValueError(f"method must be one of {', '.join(map(repr, methods))}, got {method!r}")
    return method


def head_indices(model, heads, name: str = "heads") -> List[int]:
    """Flat indices of ``heads`` (a label, or a list of labels / indices / (layer, head) pairs)."""
    return resolve_writers(list(heads) if not isinstance(heads, str) else [heads], model_spec(model), name).tolist()


def eraser_layer(model, writer, erasers) -> int:
    """The one layer of ``erasers``, checked to come after ``writer``'s layer: the causal check (fig 3)
    and V-composition (fig 5) patch or read that layer's value input. Raises ValueError otherwise."""
    spec = model_spec(model)
    w = head_indices(model, [writer], "writer")
    if len(w) != 1:
        raise ValueError(f"writer must be one head, got {writer!r}")
    layers = sorted({e // spec.n_heads for e in head_indices(model, erasers, "erasers")})
    if len(layers) != 1:
        raise ValueError(f"erasers must share one layer (the patched value input), got {list(erasers)} in layers {layers}")
    writer_layer = w[0] // spec.n_heads
    if layers[0] <= writer_layer:
        raise ValueError(f"erasers must come after the writer's layer {writer_layer}, got layer {layers[0]}")
    return layers[0]


def attribute_with_hooks(model, tokens, writers, *, targets="next", incorrect=None, backend="auto", capture="hooks",
                         **hooks):
    """`erasure_fast.attribute` with MLP nodes plus the intervention arguments of `run_attribution`
    (``extra_hooks``, ``keep_hooks``, ``scale_override``). ``capture`` as in `attribute`; a run with
    interventions or kept activations runs on hooks whatever it says."""
    model = as_transformer_lens(model)
    spec = model_spec(model)
    tokens = validate_tokens(tokens, spec)
    wr = resolve_writers(writers, spec)
    ids = target_ids(targets, tokens, spec, "targets", allow_next=True)
    inc = None if incorrect is None else torch.where(ids < 0, ids, target_ids(incorrect, tokens, spec, "incorrect", False))
    return run_attribution(model, spec, tokens.to(model_device(model)), wr, ids, inc, include_mlps=True,
                           impl=get_backend(backend, model_device(model), spec.W_O.dtype),
                           capture_mode=resolve_capture(capture, model, spec), **hooks)
