"""The capture engine for Hugging Face-loaded TransformerLens bridges: the model's own `transformers`
modules, run without the bridge, with SDPA attention, no KV cache, no final norm, no unembedding and
no gradients; a few plain torch hooks read exactly the tensors that hook capture reads.

Why the model's own modules rather than a forward rewritten from the weights: every family's rotary
variant and scaling, q/k norms, embedding multipliers, ALiBi, sliding windows, soft-capping, MoE
routing... is then exact by construction -- TransformerLens's bridge runs these same modules (with its
hook points around them, and an eager attention that materialises every pattern).

Where each tensor is read comes from the bridge itself: each hook name that `erasure_fast.capture`
reads (``blocks.{l}.attn.hook_z``, ``blocks.{l}.hook_mlp_out``, ``blocks.0.hook_resid_pre``,
``blocks.{l}.hook_resid_mid`` / ``hook_resid_post``) resolves, through the bridge's aliases, to the
``hook_in`` or ``hook_out`` of one bridge component, i.e. to the input or output of the Hugging Face
module it wraps (`base.GeneralizedComponent.forward`); Granite's scaled blocks expose the MLP output
times the residual multiplier. The engine reads the same module's input / output in an un-bridged
copy of the model: new module objects holding the very same parameter and buffer tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import metadata
from typing import Dict, List, Optional, Tuple

import torch
from packaging.version import Version

from ..capture import EMBED_HOOK, Capture, final_scale, resid_point_hooks
from ..models import ModelSpec

# The keyword names TransformerLens's components take their input from before the first positional
# argument (`GeneralizedComponent.forward`): the engine reads a module's input the same way.
_INPUT_KWARGS = ("input", "hidden_states", "input_ids", "query_input", "x", "inputs_embeds")


# Families whose float64 hook capture TransformerLens's bridge rounds differently from the model's own
# modules (measured with TransformerLens 4.3 and transformers 5.24: 1e-9 to 1e-7 relative, above the
# engine's float64 bound of 1e-12): its own rotary for Cohere's and GLM's layouts, on every CPU
# measured; around transformers' float32 attention scores for GPT-Neo and GPT-J, on an AMD EPYC (AVX2)
# but not on an Intel Xeon (AVX-512), where both agree to 3e-16 -- so they stay refused. In float32 all
# agree within 1e-6. Each with the first transformers release on which it no longer differs (None:
# it does on every release measured). These are upstream facts: tests/test_engine_families.py
# measures them on the locked releases (requirements/tl4.lock) and `make test-latest` on the newest
# ones, where a refusal that can be lifted is reported.
_F64_ROUNDS_DIFFERENTLY: Dict[str, Optional[str]] = {
    "CohereForCausalLM": None, "Cohere2ForCausalLM": None, "GlmForCausalLM": None, "Glm4ForCausalLM": None,
    "GPTNeoForCausalLM": None, "GPTJForCausalLM": None}

# Families TransformerLens bridges but cannot run (its own forward fails): there is no hook capture for
# the engine to equal, and erasure_fast fails with TransformerLens rather than return unchecked numbers.
_TRANSFORMER_LENS_FAILS = {"CodeGenForCausalLM": "TransformerLens's CodeGen attention fails in its own forward"}


def rounds_differently_in_float64(family: str) -> bool:
    """Whether TransformerLens rounds ``family``'s float64 attention differently from its transformers
    modules with the transformers installed here (`_F64_ROUNDS_DIFFERENTLY`)."""
    if family not in _F64_ROUNDS_DIFFERENTLY:
        return False
    same_from = _F64_ROUNDS_DIFFERENTLY[family]
    return same_from is None or Version(metadata.version("transformers")) < Version(same_from)


class _StopForward(Exception):
    """Raised after the last block: no final norm, no unembedding."""


@dataclass(frozen=True)
class ReadPoint:
    """Where one hook-capture tensor is in the Hugging Face model: the input (``side`` "in") or output
    ("out") of the module at ``path`` (a dotted path in the un-bridged model), times ``scale``."""

    path: str
    side: str
    scale: float = 1.0


def _is_bridge_component(module) -> bool:
    return "_original_component" in module._modules


def _hook_owner_paths(bridge) -> Dict[int, Tuple[str, str]]:
    """id(HookPoint) -> (dotted path, in the un-bridged model, of the Hugging Face module whose input /
    output it is, "in" / "out"), for the hook_in / hook_out of every bridge component -- those inside
    the model's tree and those the bridge holds beside it (e.g. a fused-QKV attention's ``o``)."""
    paths: Dict[int, str] = {}

    def walk(module, path):
        if _is_bridge_component(module):
            return walk(module._modules["_original_component"], path)
        paths.setdefault(id(module), path)
        for name, child in module._modules.items():
            if child is not None and not name.startswith("hook_"):
                walk(child, f"{path}.{name}" if path else name)

    walk(bridge.original_model, "")
    owners = {}
    for component in bridge.modules():
        if not _is_bridge_component(component):
            continue
        inner = component._modules["_original_component"]
        while _is_bridge_component(inner):
            inner = inner._modules["_original_component"]
        if id(inner) not in paths:  # a module the model itself never runs
            continue
        for side in ("in", "out"):
            hook = component._modules.get(f"hook_{side}")
            if hook is not None:
                owners.setdefault(id(hook), (paths[id(inner)], side))
    return owners


def read_points(bridge, spec: ModelSpec, names: List[str]) -> Tuple[Optional[Dict[str, ReadPoint]], Optional[str]]:
    """({hook name: `ReadPoint`}, None), or (None, why a name has no single module input / output)."""
    owners = _hook_owner_paths(bridge)
    points = {}
    for name in names:
        hook = bridge.hook_dict.get(name)
        if hook is None:
            return None, f"the bridge has no hook {name}"
        owner = owners.get(id(hook))
        if owner is not None:
            points[name] = ReadPoint(*owner)
            continue
        layer, _, leaf = name.partition(".")[2].partition(".")
        block = bridge.blocks[int(layer)]
        scale = getattr(block, "residual_contribution_scale", None)
        sub = getattr(block, "scaled_mlp_submodule", None)
        if leaf == "hook_mlp_out" and scale is not None and sub is not None:  # Granite: mlp output * multiplier
            owner = owners.get(id(getattr(block, sub).hook_out))
            if owner is not None:
                points[name] = ReadPoint(owner[0], "out", float(scale))
                continue
        return None, f"{name} is not the input or output of one module"
    return points, None


def _unbridged(module, configs: dict):
    """``module`` with every bridge component replaced by the Hugging Face module it wraps: new module
    objects (so the bridge's own tree is left as it is) sharing the parameter and buffer tensors, no
    hooks, and their own copy of each config (the engine sets its attention implementation)."""
    from transformers import PretrainedConfig

    if _is_bridge_component(module):
        return _unbridged(module._modules["_original_component"], configs)
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: (None if child is None else _unbridged(child, configs))
                    for name, child in module._modules.items() if not name.startswith("hook_")}
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if hooks in module.__dict__:
            new.__dict__[hooks] = type(module.__dict__[hooks])()
    # TransformerLens patches some modules' forward on the instance (Falcon: its linears and decoder
    # layers, to avoid in-place adds under backward hooks); those bound methods belong to the bridged
    # module, so the copy runs its class's own forward
    new.__dict__.pop("forward", None)
    for key, value in list(new.__dict__.items()):
        if isinstance(value, PretrainedConfig):
            if id(value) not in configs:
                configs[id(value)] = copy.deepcopy(value)
            new.__dict__[key] = configs[id(value)]
    return new


def _module_input(args, kwargs):
    """A module's input as TransformerLens's hook_in sees it (`_INPUT_KWARGS`, else the first argument)."""
    for name in _INPUT_KWARGS:
        if name in kwargs:
            return kwargs[name]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def _first(output):
    """A module's output as TransformerLens's hook_out sees it (the first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


# TransformerLens attentions that recompute the pattern themselves with a softmax in the model's dtype
# (fused-QKV and MPT ALiBi bridges). In float64 the engine then takes SDPA (float64 throughout) rather
# than the family's eager attention, which for some of them (GPT-NeoX, Phi-3) takes the softmax in float32.
_FULL_PRECISION_SOFTMAX = ("JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge", "MPTALiBiAttentionBridge")


def _attention_implementation(model, configs, bridge, dtype: torch.dtype) -> str:
    """Set and return the attention the engine runs: SDPA where the family has it (fused attention, no
    pattern materialised), else the family's eager attention. In float64 the one whose softmax precision
    is TransformerLens's: transformers' eager attention takes its softmax in float32 even for float64
    models, and so does TransformerLens where it runs that attention; where it recomputes the pattern
    itself (`_FULL_PRECISION_SOFTMAX`) it does not."""
    import logging

    full_precision = type(bridge.blocks[0].attn).__name__ in _FULL_PRECISION_SOFTMAX
    want = "eager" if dtype == torch.float64 and not full_precision else "sdpa"
    if want == "sdpa" and not getattr(model, "_supports_sdpa", False):
        want = "eager"
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)  # families that cannot switch dynamically only warn (handled below)
    try:
        model.set_attn_implementation(want)
    except Exception:  # the family has no such path after all: its own eager attention
        want = "eager"
        model.set_attn_implementation(want)
    finally:
        logger.setLevel(level)
    # Families whose attention predates transformers' attention interface (Falcon, Bloom, MPT, ...) read
    # the choice from their config at each forward and ignore set_attn_implementation.
    for config in configs.values():
        config._attn_implementation_internal = want
    return want


class HFModulesEngine:
    """The engine of one Hugging Face-loaded bridge (`hf_engine_problem` None): made once per spec."""

    def __init__(self, bridge, spec: ModelSpec):
        names = self.hook_names(spec)
        points, problem = read_points(bridge, spec, names)
        if problem:
            raise ValueError(problem)
        configs: dict = {}
        self.model = _unbridged(bridge.original_model, configs)
        self.model.eval()
        for config in configs.values():  # TransformerLens asks for attention weights; the engine never reads them
            config.output_attentions = False
            config.output_hidden_states = False
        self.attention = _attention_implementation(self.model, configs, bridge, spec.W_O.dtype)
        self.points = points
        self.modules = dict(self.model.named_modules())

    @staticmethod
    def hook_names(spec: ModelSpec) -> List[str]:
        """Every hook name that hook capture (`erasure_fast.capture.capture`) reads for ``spec``."""
        L = spec.n_layers
        names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + [EMBED_HOOK, f"blocks.{L - 1}.hook_resid_post"]
        if spec.has_mlps:
            names += [f"blocks.{l}.hook_mlp_out" for l in range(L)]
        if not spec.additive_blocks:
            names += resid_point_hooks(spec)
        return list(dict.fromkeys(names))

    def capture(self, spec: ModelSpec, tokens: torch.Tensor, *, include_mlps: bool = True,
                include_embed: bool = True) -> Capture:
        """The `Capture` of ``tokens`` [B, P] (validated ids on the model's device): z [B, P, L*H, d_head],
        mlp_out [B, P, L, D], embed [B, P, D], scale [B, P], resid_points [B, P, R, D] for
        non-additive blocks -- each the very tensor hook capture reads."""
        L, H, dh, D = spec.n_layers, spec.n_heads, spec.d_head, spec.d_model
        B, P = tokens.shape
        final = f"blocks.{L - 1}.hook_resid_post"
        with_mlps = include_mlps and spec.has_mlps
        point_names = [] if spec.additive_blocks or not include_embed else resid_point_hooks(spec)
        new = dict(dtype=spec.W_O.dtype, device=tokens.device)
        z = torch.empty(B, P, L * H, dh, **new)
        mlp = torch.empty(B, P, L, D, **new) if with_mlps else None
        embed = torch.empty(B, P, D, **new) if include_embed else None
        points = torch.empty(B, P, len(point_names), D, **new) if point_names else None
        resid = torch.empty(B, P, D, **new)
        # hook name -> the views its tensor is copied into when the module runs (a copy, not a reference:
        # a block may add into a module's output in place, as Falcon's does into its MLP output)
        into: Dict[str, List[torch.Tensor]] = {final: [resid]}
        for l in range(L):
            into.setdefault(f"blocks.{l}.attn.hook_z", []).append(z[:, :, l * H:(l + 1) * H])
            if with_mlps:
                into.setdefault(f"blocks.{l}.hook_mlp_out", []).append(mlp[:, :, l])
        if include_embed:
            into.setdefault(EMBED_HOOK, []).append(embed)
        for r, name in enumerate(point_names):
            into.setdefault(name, []).append(points[:, :, r])
        by_module: Dict[Tuple[str, str], List[Tuple[str, float]]] = {}
        for name in into:
            point = self.points[name]
            by_module.setdefault((point.path, point.side), []).append((name, point.scale))
        final_key = (self.points[final].path, self.points[final].side)
        seen = set()

        def keep(entries, tensor, stop):
            if tensor is None:
                raise RuntimeError(f"capture engine: the module of {entries[0][0]} was called without a tensor input")
            for name, scale in entries:
                for view in into[name]:
                    # [B, P, ...]: some modules see the positions flattened (OPT's, Llama 4's MLPs: [B*P, D])
                    source = tensor.reshape(view.shape)
                    view.copy_(source if scale == 1.0 else source * scale)
                seen.add(name)
            if stop:
                raise _StopForward

        handles = []
        try:
            for (path, side), entries in by_module.items():
                module, stop = self.modules[path], (path, side) == final_key
                if side == "in":
                    handles.append(module.register_forward_pre_hook(
                        lambda m, a, k, e=entries, s=stop: keep(e, _module_input(a, k), s), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(
                        lambda m, a, o, e=entries, s=stop: keep(e, _first(o), s)))
            with torch.inference_mode():
                try:
                    self.model(input_ids=tokens, use_cache=False)
                except _StopForward:
                    pass
                scale = final_scale(resid, spec)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in into if name not in seen]
        if missing:
            raise RuntimeError(f"capture engine: {', '.join(missing[:3])} never read from the model's modules")
        return Capture(z=z, mlp_out=mlp, embed=embed, scale=scale, extra={}, resid_points=points)


def hf_engine_problem(bridge, spec: ModelSpec) -> Optional[str]:
    """Why the engine does not cover this Hugging Face-loaded bridge (one line), or None. Reads the
    bridge's structure only (no forward pass)."""
    if getattr(bridge, "compatibility_mode", False) or getattr(bridge, "_weights_processed", False):
        return (f"{spec.family}: compatibility mode or processed weights (TransformerLens folds and centres the "
                "weights and runs its own forward; the engine runs the model's own modules)")
    if not isinstance(getattr(bridge, "original_model", None), torch.nn.Module) or not hasattr(
            bridge.original_model, "set_attn_implementation"):
        return f"{spec.family}: the bridge holds no transformers model to run"
    devices = {str(d) for d in (getattr(bridge.original_model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1 or "disk" in devices:  # accelerate moves tensors in per-module hooks the copy drops
        return (f"{spec.family}: a model dispatched over several devices or offloaded with a device_map "
                "(accelerate's hooks place its tensors)")
    if spec.family in _TRANSFORMER_LENS_FAILS:
        return f"{spec.family}: {_TRANSFORMER_LENS_FAILS[spec.family]} (no hook capture to equal)"
    if spec.W_O.dtype == torch.float64 and rounds_differently_in_float64(spec.family):
        return (f"{spec.family}: in float64 TransformerLens rounds this family's attention differently from its "
                "transformers modules (1e-9 to 1e-7 relative), so hook capture keeps TransformerLens's numbers")
    if "hf_engine_problem" not in spec.derived:  # the bridge's structure is fixed for the spec's life
        _, problem = read_points(bridge, spec, HFModulesEngine.hook_names(spec))
        spec.derived["hf_engine_problem"] = f"{spec.family}: {problem}" if problem else None
    return spec.derived["hf_engine_problem"]
