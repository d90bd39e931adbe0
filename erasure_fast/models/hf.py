"""Plain Hugging Face `transformers` models: bridged through TransformerLens 4's own architecture
adapters (`TransformerBridge.boot_transformers(hf_model=...)`), so every family has one layout table --
TransformerLens's -- and the same weights give the same numbers as a bridge the user built.

TransformerLens bridges a model in place (it replaces the model's submodules with its bridge components
and switches its attention implementation), and a second bridge of an already bridged module reads a
wrong per-head W_O (TransformerLens 4.3). So the user's model is never bridged: a structural copy is --
new module objects holding the very same parameter and buffer tensors (no weight memory is copied, and
in-place edits of the weights are seen), without the model's hooks."""

from __future__ import annotations

import copy
import itertools
import sys
import warnings
import weakref

from ..optional_deps import import_optional
from .layout import UnsupportedModelError

# model -> (weak references to its parameters when bridged, bridge). The bridge holds no reference to
# the model itself (only to its tensors), so the entry goes with the model.
_bridges: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_hf_model(model) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _same_parameters(refs, model) -> bool:
    params = list(model.parameters())
    return len(params) == len(refs) and all(r() is p for r, p in zip(refs, params))


def _structural_copy(model):
    """New module objects sharing ``model``'s parameter and buffer tensors, with no hooks."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, shared)
    for module in clone.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                      getattr(module, "_backward_pre_hooks", {})):
            hooks.clear()
    return clone


def bridge_of_hf(hf_model, tokenizer=None):
    """The TransformerLens 4 bridge of a structural copy of ``hf_model`` (made once per model and
    remade when its parameter objects are replaced; ``tokenizer`` is used when it is made, else the
    model's own is loaded from ``config._name_or_path``). ``hf_model`` itself is left as it was."""
    hit = _bridges.get(hf_model)
    if hit is not None and _same_parameters(hit[0], hf_model):
        return hit[1]
    arch = type(hf_model).__name__
    if import_optional("transformer_lens.model_bridge") is None:  # installed but broken: raises, saying why
        raise UnsupportedModelError(f"{arch}: plain transformers models are bridged through TransformerLens 4, "
                                    "which is not installed (pip install 'transformer-lens>=4')")
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformer_lens.model_bridge import TransformerBridge
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{arch}: TransformerLens {_tl_version()} has no architecture adapter for it, "
                                    "so its attention heads cannot be located")
    name = getattr(hf_model.config, "_name_or_path", "") or ""
    if tokenizer is None and not name:
        raise ValueError(f"model: this {arch} was not loaded with from_pretrained, so its tokenizer cannot be found; "
                         "pass erasure_fast.as_transformer_lens(model, tokenizer=...) instead of the model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name or arch, hf_model=_structural_copy(hf_model),
                                                     tokenizer=tokenizer)
    bridge.eval()
    _bridges[hf_model] = ([weakref.ref(p) for p in hf_model.parameters()], bridge)
    return bridge


def _tl_version() -> str:
    from importlib import metadata

    return metadata.version("transformer-lens")
