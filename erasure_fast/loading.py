"""Loading models by name: the real GELU-4L from the local Hugging Face cache, TransformerLens-style
checkpoint directories, Hugging Face checkpoints of any family TransformerLens 4 bridges (a directory or
a cached ``owner/name`` whose ``config.json`` names its ``architectures``), and the planted demo model.

A TransformerLens-style directory (the layout of the NeelNanda/* repos) holds ``config.json`` with
d_model, n_layers, n_heads, d_head, d_mlp, d_vocab, n_ctx, act_fn and normalization_type (or
``normalization``), and weights in HookedTransformer parameter naming (``blocks.0.attn.W_O`` ...) as
``model.safetensors`` or a ``*.pth`` state dict (read with ``weights_only=True``; ``*final.pth``
preferred when there are several).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional, Tuple

import torch

from .paths import expand_path
from .tl_models import ModelLoadError, check_processing, model_from_tl_state_dict

GELU_4L_REPO = "NeelNanda/GELU_4L512W_C4_Code"
ALIASES = {"gelu-4l": GELU_4L_REPO, GELU_4L_REPO.lower(): GELU_4L_REPO}
_REQUIRED = ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn")
# A Hugging Face repo id: owner/name, neither starting with '.' or '-' (anything else is a path)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SIZES = ("d_model", "n_layers", "n_heads", "d_head", "d_vocab", "n_ctx")  # each an int >= 1 (d_mlp: >= 0)


def check_device(device, name: str = "device") -> Optional[torch.device]:
    """``device`` (None, a name or a torch.device) as a device this machine has, or a ValueError whose
    message starts with ``name``: a name torch does not know, a CUDA / MPS device that is not here, or
    the meta device (it holds no values to analyse)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "meta":
        raise ValueError(f"{name}: the meta device holds no values to analyse; use cpu or cuda")
    try:
        torch.empty(0, device=dev)  # reaches the device: CUDA that is not here, an index that does not exist
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"{name}: {device!r} is not available here ({str(e).splitlines()[0][:150]})") from None
    return dev


def _read_config_json(path: str) -> dict:
    """``path``/config.json as a JSON object, or a ModelLoadError naming the file (and where it breaks)."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise ModelLoadError(f"{cfg_path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_path}: holds a JSON {type(raw).__name__}, not an object of settings")
    return raw


def hf_snapshot_dir(repo_id: str, cache_dir: Optional[str] = None) -> str:
    """The local snapshot of ``repo_id`` in the Hugging Face cache, without any network access."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id} is not in the local Hugging Face cache ({type(e).__name__}). On a machine with "
            f"internet access run `huggingface-cli download {repo_id}` (or "
            f"`python -c \"import huggingface_hub as h; h.snapshot_download('{repo_id}')\"`), then copy "
            "the cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE) here."
        ) from None


def read_tl_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{path}: no config.json (a TransformerLens-style checkpoint directory needs one)")
    raw = _read_config_json(path)
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ModelLoadError(f"{cfg_path}: missing keys {missing}")
    for key in _SIZES + ("d_mlp",):
        value, least = raw[key], 0 if key == "d_mlp" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ModelLoadError(f"{cfg_path}: {key} must be an integer >= {least}, got {value!r}")
    if not isinstance(raw["act_fn"], str):
        raise ModelLoadError(f"{cfg_path}: act_fn must be a string, got {raw['act_fn']!r}")

    norm = raw.get("normalization_type", raw.get("normalization", "LN"))
    if raw.get("shortformer_pos", False) or raw.get("positional_embedding_type", "standard") != "standard":
        raise ModelLoadError(f"{cfg_path}: only standard positional embeddings are supported")
    cfg = {k: raw[k] for k in _REQUIRED}
    cfg.update(normalization_type=norm, attn_only=bool(raw.get("attn_only", False)),
               tokenizer_name=raw.get("tokenizer_name"), final_rms=bool(raw.get("final_rms", False)))
    return cfg


def read_tl_weights(path: str) -> dict:
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except Exception as e:  # safetensors raises its own error type for a truncated or corrupt file
            raise ModelLoadError(f"{st}: cannot be read as safetensors ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]}); the file may be truncated") from None
    pths = sorted(glob.glob(os.path.join(path, "*.pth")))
    finals = [p for p in pths if p.endswith("final.pth")]
    pick = finals[0] if finals else (pths[0] if len(pths) == 1 else None)
    if pick is None:
        raise ModelLoadError(
            f"{path}: no model.safetensors and {'no' if not pths else 'several'} *.pth files "
            f"({[os.path.basename(p) for p in pths][:5]}); expected one state dict"
        )
    try:
        sd = torch.load(pick, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{pick}: cannot be read as a state dict with weights_only=True ({e})") from None
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{pick}: expected a state dict, got {type(sd).__name__}")
    return sd


def _tokenizer(name: Optional[str]):
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:
        return None  # tokenizer not cached: token-id corpora still work


def is_hf_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a Hugging Face checkpoint (its config.json names ``architectures`` and is
    not a TransformerLens-style config). A config.json that is not a JSON object is a ModelLoadError."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    raw = _read_config_json(path)
    return bool(raw.get("architectures")) and not all(k in raw for k in _REQUIRED)


def load_hf_checkpoint(path: str, *, device=None, dtype: torch.dtype = torch.float32):
    """A Hugging Face checkpoint directory -> TransformerLens 4 ``TransformerBridge`` (with its tokenizer
    when the directory has one). A family per-head attribution cannot cover is refused later, by
    `erasure_fast.model_spec`, with the family and why."""
    from .tl_models import tl_major

    if tl_major() < 4:
        raise ModelLoadError(f"{path}: Hugging Face checkpoints are bridged through TransformerLens 4 "
                             "(pip install 'transformer-lens>=4')")
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    from transformers.utils import logging as hf_logging

    tok = _tokenizer(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weights-loading bar per model; set back below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = TransformerBridge.boot_transformers(path, dtype=dtype, tokenizer=tok, device=device)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot be bridged by TransformerLens ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def load_tl_checkpoint(path: str, *, device=None, dtype: torch.dtype = torch.float32, name: Optional[str] = None,
                       processing: str = "raw"):
    """A TransformerLens-style checkpoint directory -> TL 4 ``TransformerBridge`` (TL 3:
    ``HookedTransformer``), weights loaded strictly, raw or processed as ``from_pretrained`` does
    (``processing``, see `erasure_fast.tl_models.from_pretrained_processing`)."""
    cfg = read_tl_config(path)
    tok = _tokenizer(cfg.get("tokenizer_name"))
    model = model_from_tl_state_dict(cfg, read_tl_weights(path), tokenizer=tok, dtype=dtype,
                                     name=name or os.path.basename(path.rstrip("/")), path=path, processing=processing)
    return model.to(device) if device is not None else model


def locate_model(name: str, *, cache_dir: Optional[str] = None) -> Tuple[str, Optional[str], Optional[str]]:
    """Where ``name`` (as `load_model` takes it) is, without loading it: (kind, path, repo) with kind
    "demo" (path None), "hf" (a Hugging Face checkpoint directory) or "tl" (a TransformerLens-style
    one); repo the Hugging Face repo it came from, else None. ModelLoadError when there is none."""
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):
        raise TypeError(f"model: expected a model name or directory, got {name!r}")
    if name == "demo":
        return "demo", None, None
    name = expand_path(name)
    repo = None
    if os.path.isdir(name):
        path = name
    else:
        repo = ALIASES.get(name.lower(), name)
        if not _REPO_ID.fullmatch(repo):
            if os.path.lexists(name):
                raise ModelLoadError(f"{name}: not a directory; a model is a checkpoint directory (config.json and "
                                     "weights), 'demo', 'gelu-4l' or a cached owner/name repo")
            if os.sep in name or name.startswith((".", "~")):
                raise ModelLoadError(f"{name}: no such directory")
            raise ModelLoadError(f"unknown model {name!r}: use 'demo', 'gelu-4l', a cached owner/name repo or a directory")
        path = hf_snapshot_dir(repo, expand_path(cache_dir))
    return ("hf" if is_hf_checkpoint(path) else "tl"), path, repo


def load_model(name: str, *, device=None, dtype: torch.dtype = torch.float32, cache_dir: Optional[str] = None,
               processing: str = "raw"):
    """``demo`` (planted GELU-4L-shaped model), ``gelu-4l`` / ``NeelNanda/GELU_4L512W_C4_Code`` (local HF
    cache only), another cached ``owner/name`` repo, or a checkpoint directory (``~`` and ``$VARS``
    expanded, in ``cache_dir`` too) -- TransformerLens-style, or a Hugging Face checkpoint of a family TransformerLens 4
    bridges. ``device`` is checked first (`check_device`).

    ``processing`` (TransformerLens-style checkpoints and the demo model): "raw", the weights as stored,
    or "from_pretrained", processed as TransformerLens's ``HookedTransformer.from_pretrained`` does by
    default (fold_ln, center_writing_weights, center_unembed, fold_value_biases) -- how the paper's
    authors loaded GELU-4L. A Hugging Face checkpoint is bridged as stored, so it takes "raw" only."""
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):
        raise TypeError(f"model: expected a model name or directory, got {name!r}")
    check_processing(processing)
    check_device(device)
    kind, path, repo = locate_model(name, cache_dir=cache_dir)
    if kind == "demo":
        from .demo import planted_model

        model, _ = planted_model(processing=processing)
        return model.to(device) if device is not None else model
    if kind == "hf":
        if processing != "raw":
            raise ModelLoadError(f"{path}: a Hugging Face checkpoint is bridged as stored; processing={processing!r} "
                                 "applies to TransformerLens-style checkpoints (use processing='raw')")
        return load_hf_checkpoint(path, device=device, dtype=dtype)
    return load_tl_checkpoint(path, device=device, dtype=dtype, name=repo, processing=processing)
