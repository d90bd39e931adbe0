"""nnsight `TransformersModel`s (`LanguageModel` among them): the Hugging Face model one wraps
(``lm._module``), bridged as in `hf`."""

from __future__ import annotations

from .hf import bridge_of_hf


def is_nnsight_model(model) -> bool:
    return type(model).__module__.startswith("nnsight.")


def bridge_of_nnsight(lm, tokenizer=None):
    """The TransformerLens 4 bridge of the Hugging Face model inside ``lm`` (`hf.bridge_of_hf`, with
    ``lm``'s tokenizer unless one is given). A model not yet dispatched (weights on the meta device)
    is refused."""
    hf_model = getattr(lm, "_module", None)
    if hf_model is None or not hasattr(hf_model, "config"):
        raise TypeError(f"model: this nnsight {type(lm).__name__} wraps no Hugging Face transformers model")
    if any(p.device.type == "meta" for p in hf_model.parameters()):
        raise ValueError("model: the nnsight model's weights are not loaded yet (meta device); create it with "
                         f"{type(lm).__name__}(..., dispatch=True) or pass a loaded transformers model")
    return bridge_of_hf(hf_model, tokenizer if tokenizer is not None else getattr(lm, "tokenizer", None))
