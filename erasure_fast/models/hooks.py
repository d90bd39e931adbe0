"""Hooks a user attached to their model: the model analysed is the model as the user has it.

Researchers ablate, steer or patch a model with hooks and then call the analysis. Forward hooks and
forward pre-hooks on any module -- a TransformerLens hook point (``model.add_hook``), any other module
(``register_forward_hook``), or every module at once (``torch.nn.modules.module.register_module_forward_hook``)
-- are found here, and then:

- a TransformerLens model runs through them: capture takes TransformerLens's hooked forward (the
  engine runs no hooks, so ``capture="engine"`` is refused) and reads the residual points from the
  stream itself, since a hook may have made it other than the sum of the nodes;
- hooks that act after the last block (the final norm, the unembedding, the model's own call), where
  the forward pass stops, and every hook of a `transformers` model or nnsight `LanguageModel` (which
  is analysed through a TransformerLens bridge of a copy that does not run them) are refused, naming
  the hook.

Backward hooks are left alone: the analysis runs no backward pass; so are the hooks TransformerLens and
transformers install themselves (a bridge's capture wiring, transformers' record-only output capturing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

import torch

# Where TransformerLens models end: the modules the forward pass never reaches once it stops at the
# last block's residual stream (`erasure_fast.capture`).
_AFTER_LAST_BLOCK = ("ln_final", "unembed")


@dataclass(frozen=True)
class UserHook:
    where: str  # the hook point's or module's name in the model ("" = the model itself, "*" = every module)
    kind: str  # "forward hook", "forward pre-hook", "global forward hook", ...
    function: str  # the hook function's name

    def __str__(self) -> str:
        place = {"": "the model itself", "*": "every module"}.get(self.where, self.where)
        return f"{self.kind} {self.function} on {place}"


def _function_name(fn) -> str:
    name = getattr(fn, "__name__", None) or ""
    # TransformerLens wraps a hook point's function and names the wrapper after the function's repr
    wrapped = re.fullmatch(r"<(?:function|bound method) ([\w.<>]+?)(?: of .*)? at 0x[0-9a-f]+>", name)
    if wrapped:
        return wrapped.group(1).rsplit(".", 1)[-1]
    return name or type(fn).__name__


# Libraries whose own hooks are part of how a model runs, not changes to it: TransformerLens wires
# capture hooks into a bridge's blocks on first use, transformers installs record-only output-capturing
# hooks on a model's first forward pass.
_LIBRARIES = ("transformer_lens.", "transformers.")


def _library_own(module, fn) -> bool:
    """A hook a library installs itself -- not one of the user's. A hook point's hooks are the user's:
    TransformerLens wraps each user function in one of its own."""
    return (getattr(fn, "__module__", "") or "").startswith(_LIBRARIES) and not _is_hook_point(module)


def _is_hook_point(module) -> bool:
    return type(module).__name__ == "HookPoint" and type(module).__module__.startswith("transformer_lens.")


def user_hooks(model: torch.nn.Module) -> List[UserHook]:
    """Every forward hook and forward pre-hook on ``model``'s modules and TransformerLens hook points
    (named by their hook name; a bridge holds some beside its module tree), then every global module
    forward hook, in that order."""
    from torch.nn.modules import module as torch_module

    points = getattr(model, "hook_dict", None) or {}
    modules = {id(m): m for m in model.modules()}
    for point in points.values():
        modules.setdefault(id(point), point)
    hooked = [(module, kind, fn) for module in modules.values()
              for kind, registry in (("forward hook", module._forward_hooks), ("forward pre-hook", module._forward_pre_hooks))
              for fn in registry.values() if not _library_own(module, fn)]
    found = []
    if hooked:
        # each module by its shortest name: a bridge reaches a module by several paths (blocks.0.attn and
        # blocks.0._original_component.attn), and a hook point by several hook names (hook_z and o.hook_in)
        aliases = {}
        for name, module in [*model.named_modules(remove_duplicate=False), *points.items()]:
            aliases.setdefault(id(module), []).append(name)
        names = {key: min(found, key=len) for key, found in aliases.items()}
        found = [UserHook(names[id(module)], kind, _function_name(fn)) for module, kind, fn in hooked]
    for kind, registry in (("global forward hook", torch_module._global_forward_hooks),
                           ("global forward pre-hook", torch_module._global_forward_pre_hooks)):
        found += [UserHook("*", kind, _function_name(fn)) for fn in registry.values()]
    return found


def describe_hooks(hooks: List[UserHook], most: int = 3) -> str:
    """The hooks in one line (the first ``most`` of them)."""
    return "; ".join(str(h) for h in hooks[:most]) + (f"; and {len(hooks) - most} more" if len(hooks) > most else "")


def refuse_hooks_of_copied_model(model: torch.nn.Module, interface: str) -> None:
    """A `transformers` model (or an nnsight LanguageModel's) is analysed through a TransformerLens
    bridge of a copy of its modules, which does not run the model's hooks: a ValueError naming them."""
    hooks = user_hooks(model)
    if hooks:
        raise ValueError(
            f"model: this {interface} has hooks attached ({describe_hooks(hooks)}); erasure_fast analyses it through "
            "a TransformerLens bridge of a copy of its modules, which would not run them, so the numbers would not "
            "be your model's. Remove them (handle.remove()), or take the bridge, erasure_fast.as_transformer_lens("
            "model), put them on its hook points and pass the bridge")


def hooks_to_run(model: torch.nn.Module) -> List[UserHook]:
    """The hooks of a TransformerLens ``model`` that capture runs through (hooks capture runs them all);
    a ValueError naming any that act where the forward pass never gets -- after the last block, or
    on the model's own call, which TransformerLens's ``run_with_hooks`` bypasses."""
    hooks = user_hooks(model)
    unreachable = [h for h in hooks if h.where == "" or h.where.split(".")[0] in _AFTER_LAST_BLOCK]
    if unreachable:
        raise ValueError(
            f"model: {describe_hooks(unreachable)}: erasure_fast's forward pass stops at the last block's residual stream "
            "(no final norm, no unembedding) and runs the model through TransformerLens's run_with_hooks, so this "
            "hook would not run and its effect could not be attributed; remove it (model.reset_hooks(), "
            "handle.remove()) or move it to a hook point inside the blocks")
    return hooks
