"""Providers of the kernel workloads: TransformerLens's method, the project's backends, torch.compile.

Each provider is ``make(model, inputs, workload) -> PreparedWorkload | None`` (None: the provider does
not do that workload). ``PreparedWorkload.call`` does the whole workload once and is what the harness
times; ``PreparedWorkload.canonical`` turns a call's result into the one form every provider is
checked in against the float64 reference (untimed):

    dla  [T, N]         N = n_layers * n_heads heads, T = batch * pos tokens flattened batch-major
    pr   [T, N + M, W]  K1 only: projection ratio of every head, then every MLP, onto every head
                        (W = N writers)

restricted to the first ``n`` tokens (the harness checks a prefix to keep the check cheap)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Dict, Optional

import torch

from ..contract import FusedOutputs, fused_attribution, projection_ratio, validate
from ..models import model_spec
from .workloads import kernel_args


@dataclass(frozen=True)
class PreparedWorkload:
    """One provider's workload on one input: ``call()`` (timed) and ``canonical(result, n)`` (untimed)."""

    call: Callable[[], Any]
    canonical: Callable[[Any, int], Dict[str, torch.Tensor]]


def tl_version() -> str:
    return metadata.version("transformer-lens")


def _tl_cache(model, inp, with_mlps: bool):
    from transformer_lens import ActivationCache

    L = inp.z.shape[2]
    d = {f"blocks.{l}.attn.hook_z": inp.z[:, :, l] for l in range(L)}
    if with_mlps:
        d.update({f"blocks.{l}.hook_mlp_out": inp.mlp_out[:, :, l] for l in range(L)})
    d["ln_final.hook_scale"] = inp.scale[..., None]
    return ActivationCache(d, model)


def paper_pr(nodes: torch.Tensor, writers: torch.Tensor) -> torch.Tensor:
    """(a.w)/(w.w) on materialised stacks: nodes [A, B, P, D], writers [W, B, P, D] -> [B, P, A, W]."""
    dots = torch.einsum("abpd,wbpd->bpaw", nodes, writers)
    ww = (writers * writers).sum(-1).permute(1, 2, 0)[:, :, None, :]
    return dots / ww


def _tl_canonical(workload: str):
    """TransformerLens's logit_attrs gives [N, B, P]; its K1 PR is [B, P, N + M, W]."""

    def token_major(dla: torch.Tensor, n: int) -> torch.Tensor:
        return dla.reshape(dla.shape[0], -1)[:, :n].T

    def canonical(result, n: int) -> Dict[str, torch.Tensor]:
        if workload != "K1":
            return {"dla": token_major(result, n)}
        dla, pr = result
        return {"dla": token_major(dla, n), "pr": pr.reshape(-1, *pr.shape[2:])[:n]}

    return canonical


def transformer_lens(model, inp, workload: str) -> PreparedWorkload:
    """What a researcher writes today: stack_head_results(apply_ln=False) + logit_attrs (+ paper PR).
    At the last position the next token is replaced by the token itself (TransformerLens needs a
    target everywhere); the reference has no target there (NaN), so that DLA is not compared."""
    next_tok = torch.where(inp.next_ids < 0, inp.tokens, inp.next_ids)

    def run():
        cache = _tl_cache(model, inp, with_mlps=workload == "K1")  # fresh: TL caches head results
        stack = cache.stack_head_results(layer=-1, apply_ln=False)
        if workload == "K2f":
            return cache.logit_attrs(stack, inp.pair[0], incorrect_tokens=inp.pair[1])
        dla = cache.logit_attrs(stack, next_tok)
        if workload != "K1":
            return dla
        L = inp.z.shape[2]
        mlps = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])
        return dla, paper_pr(torch.cat([stack, mlps]), stack)

    return PreparedWorkload(run, _tl_canonical(workload))


def contract_args(model, inp, workload: str) -> dict:
    """The `fused_attribution` keyword arguments of a workload (also what the reference is run on)."""
    spec = model_spec(model)
    return kernel_args(inp, workload, spec.W_O, spec.W_U, spec.directions, spec.center)


def contract_canonical(workload: str):
    """Canonical form of a `FusedOutputs` (every project provider, and the reference itself): K2f's
    fixed-set DLA [T, N, 1] becomes [T, N]; K1's PR follows from dots and norms (every head a writer)."""

    def canonical(result: FusedOutputs, n: int) -> Dict[str, torch.Tensor]:
        dla = result.dla[:n]
        out = {"dla": dla.reshape(dla.shape[0], dla.shape[1])}
        if workload == "K1":
            writers = torch.arange(result.dots.shape[2], device=result.dots.device)
            out["pr"] = projection_ratio(result.dots[:n], result.norms[:n], writers)
        return out

    return canonical


def backend(name: str):
    def make(model, inp, workload: str) -> PreparedWorkload:
        args = contract_args(model, inp, workload)
        return PreparedWorkload(lambda: fused_attribution(**args, backend=name), contract_canonical(workload))

    return make


def cpp_with_table(lazy: bool):
    """Next-token DLA (K2n) on the C++ backend with the per-model W_O c(W_U) table. Complete: the
    first call builds every row (so the cold time includes the whole build), later calls gather.
    Lazy: the first call builds the rows of its own targets, later calls gather (and build the
    rows of targets they see first)."""

    def make(model, inp, workload: str) -> Optional[PreparedWorkload]:
        if workload != "K2n":
            return None
        from ..backends import backend_instance

        cpp = backend_instance("cpp")
        args = contract_args(model, inp, workload)
        state = {}

        def run():
            if "table" not in state:
                state["table"] = cpp.build_dla_table(args["W_O"], args["directions"], args["center"], lazy=lazy)
            return fused_attribution(**args, backend="cpp", dla_table=state["table"])

        return PreparedWorkload(run, contract_canonical(workload))

    return make


def torch_compile(model, inp, workload: str) -> PreparedWorkload:
    """torch.compile of the reference math (the first thing a user would try): the per-chunk function
    is compiled (the token loop stays in Python, so the graph is not unrolled over chunks)."""
    from ..backends import backend_instance

    args = contract_args(model, inp, workload)
    inputs = validate(**args)
    # A fresh compilation per point: dynamo's recompile limit would otherwise silently fall back to
    # eager after a few sizes. Compilation happens in the harness's warm-up call, not in the timing.
    torch._dynamo.reset()
    impl = backend_instance("torch").compiled(lambda fn: torch.compile(fn, dynamic=False))
    return PreparedWorkload(lambda: impl.run(inputs), contract_canonical(workload))


def available_providers(device: torch.device) -> Dict[str, Callable]:
    """Every provider that can run on ``device`` here, by display name."""
    from ..backends import available_backends

    try:
        out = {f"transformer_lens {tl_version()}": transformer_lens}
    except metadata.PackageNotFoundError:
        out = {"transformer_lens (not installed)": transformer_lens}
    info = available_backends()
    out["erasure_fast torch"] = backend("torch")
    out["torch.compile(reference)"] = torch_compile
    if device.type == "cpu" and info["cpp"].available:
        out["erasure_fast cpp"] = backend("cpp")
        out["erasure_fast cpp + W_U table"] = cpp_with_table(lazy=False)
        out["erasure_fast cpp + lazy W_U table"] = cpp_with_table(lazy=True)
    if device.type == "cuda" and info["triton"].available:
        out["erasure_fast triton"] = backend("triton")
    return out


def select_providers(device: torch.device, wanted=None) -> Dict[str, Callable]:
    """The available providers whose names contain one of the substrings in ``wanted`` (all when
    None). Raises ValueError naming ``providers`` and the available names when ``wanted`` is empty
    or one of its entries matches no provider (a typo would otherwise run nothing)."""
    available = available_providers(device)
    if wanted is None:
        return available
    if isinstance(wanted, str):
        wanted = [wanted]
    wanted = list(wanted)
    names = ", ".join(repr(n) for n in available)
    bad = [w for w in wanted if not isinstance(w, str) or not w]
    if not wanted or bad:
        raise ValueError(f"providers must be non-empty name substrings, got {wanted!r}; available on {device}: {names}")
    unmatched = [w for w in wanted if not any(w in name for name in available)]
    if unmatched:
        raise ValueError(f"providers {unmatched} match no provider on {device}; available: {names}")
    return {k: v for k, v in available.items() if any(w in k for w in wanted)}
