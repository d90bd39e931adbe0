"""Providers of the kernel workloads: TransformerLens's method, the project's backends, torch.compile.

Each provider is ``make(model, inputs, workload) -> callable``; the callable does the whole workload
once (its result is returned so the harness can check it is finite)."""

from __future__ import annotations

from importlib import metadata
from typing import Callable, Dict, Optional

import torch

from ..contract import fused_attribution, validate
from ..models import model_spec


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


def _paper_pr(nodes: torch.Tensor, writers: torch.Tensor) -> torch.Tensor:
    """(a.w)/(w.w) on materialised stacks: nodes [A, B, P, D], writers [W, B, P, D] -> [B, P, A, W]."""
    dots = torch.einsum("abpd,wbpd->bpaw", nodes, writers)
    ww = (writers * writers).sum(-1).permute(1, 2, 0)[:, :, None, :]
    return dots / ww


def transformer_lens(model, inp, workload: str) -> Callable:
    """What a researcher writes today: stack_head_results(apply_ln=False) + logit_attrs (+ paper PR)."""
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
        return dla, _paper_pr(torch.cat([stack, mlps]), stack)

    return run


def _contract_args(model, inp, workload: str):
    spec = model_spec(model)
    B, P, L, H, dh = inp.z.shape
    T = B * P
    z = inp.z.reshape(T, L * H, dh)
    W_O = spec.W_O.to(z.device, z.dtype)
    scale = inp.scale.reshape(T)
    if workload == "K2f":
        c, i = inp.pair
        d = (spec.W_U[:, c] - spec.W_U[:, i]).to(z.device, z.dtype)[None]
        return dict(z=z, W_O=W_O, directions=d, scale=scale, writers=[], center=spec.center, with_norms=False)
    args = dict(z=z, W_O=W_O, directions=spec.directions.to(z.device, z.dtype), scale=scale,
                direction_ids=inp.next_ids.reshape(T), center=spec.center)
    if workload == "K1":
        args.update(writers=list(range(L * H)), extra_nodes=inp.mlp_out.reshape(T, L, -1))
    else:
        args.update(writers=[], with_norms=False)
    return args


def backend(name: str):
    def make(model, inp, workload: str) -> Callable:
        args = _contract_args(model, inp, workload)
        return lambda: fused_attribution(**args, backend=name)

    return make


def cpp_with_table(lazy: bool):
    """Next-token DLA (K2n) on the C++ backend with the per-model W_O c(W_U) table. Complete: the
    first call builds every row (so the cold time includes the whole build), later calls gather.
    Lazy: the first call builds the rows of its own targets, later calls gather (and build the
    rows of targets they see first)."""

    def make(model, inp, workload: str) -> Optional[Callable]:
        if workload != "K2n":
            return None
        from ..backends.dla_table import build_dla_table

        args = _contract_args(model, inp, workload)
        state = {}

        def run():
            if "table" not in state:
                state["table"] = build_dla_table(args["W_O"], args["directions"], args["center"], lazy=lazy)
            return fused_attribution(**args, backend="cpp", dla_table=state["table"])

        return run

    return make


def torch_compile(model, inp, workload: str) -> Callable:
    """torch.compile of the reference math (the first thing a user would try): the per-chunk function
    is compiled (the token loop stays in Python, so the graph is not unrolled over chunks)."""
    from ..backends import torch_ref

    args = _contract_args(model, inp, workload)
    inputs = validate(**args)
    # A fresh compilation per point: dynamo's recompile limit would otherwise silently fall back to
    # eager after a few sizes. Compilation happens in the harness's warm-up call, not in the timing.
    torch._dynamo.reset()
    compiled = torch.compile(torch_ref.chunk_outputs, dynamic=False)
    return lambda: torch_ref.run(inputs, chunk_fn=compiled)


def available_providers(device: torch.device) -> Dict[str, Callable]:
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
