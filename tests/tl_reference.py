"""The checks every model layout must pass: erasure_fast's numbers against TransformerLens's own cache
(TransformerLens 4 bridges and 3.x HookedTransformer alike), shared by tests/test_families.py and
tests/test_layouts.py."""

from __future__ import annotations

import torch

import erasure_fast as ef
from conftest import record_error, rel_err


def forward_calls(model) -> list:
    """A list that grows whenever any top-level submodule of ``model`` runs (the embedding runs first in
    every forward pass), to show that a refusal came before any work. It counts by wrapping each
    submodule's ``forward`` on the instance, not with a forward hook: a hook is the user's change to
    the model, which erasure_fast runs through (or refuses) -- not an observer."""
    calls = []
    for _, child in model.named_children():
        def counted(*args, _forward=child.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)

        object.__setattr__(child, "forward", counted)  # on the instance itself (bridge components forward setattr)
    return calls


def logit_attrs(model, cache, stack, tokens, incorrect=None):
    """TransformerLens's ``cache.logit_attrs``; for a model without a final norm (GPT-1), whose
    ``logit_attrs`` fails looking for one, its definition without the norm: stack . W_U[:, token]."""
    if "ln_final.hook_scale" in cache:
        return cache.logit_attrs(stack, tokens, incorrect_tokens=incorrect)
    B, P = stack.shape[1:3]
    directions = model.W_U.T[torch.as_tensor(tokens).expand(B, P)]
    if incorrect is not None:
        directions = directions - model.W_U.T[torch.as_tensor(incorrect).expand(B, P)]
    return (stack * directions).sum(-1)


def check_against_cache(model, tokens: torch.Tensor, *, writer: int, label: str, dtype, backends, tol: float) -> float:
    """DLA (next token, a fixed token, a logit difference), PR of every node, residual PR and adjusted
    DLA of ``attribute(model, tokens)`` vs TransformerLens's cache of the same run, for each backend.
    Returns the largest relative error (each also recorded for the error report)."""
    B, P = tokens.shape
    _, cache = model.run_with_cache(tokens)
    spec = ef.model_spec(model)
    L = spec.n_layers
    stack = cache.stack_head_results(layer=-1, apply_ln=False)  # [n_heads_total, B, P, D]
    mlps = [cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)] if spec.has_mlps else []
    nodes = torch.cat([stack] + ([torch.stack(mlps)] if mlps else [])).double()
    w = stack[writer].double()
    ww = (w * w).sum(-1)
    points = {"resid_pre0": "blocks.0.hook_resid_pre"}
    for l in range(L):
        points[f"resid_mid{l}"] = f"blocks.{l}.hook_resid_mid"
        points[f"resid_post{l}"] = f"blocks.{l}.hook_resid_post"
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    ref_next = logit_attrs(model, cache, stack, nxt)[:, :, :-1]
    ref_fixed = logit_attrs(model, cache, stack, 5)
    ref_diff = logit_attrs(model, cache, stack, 7, 3)
    pr_ref = (nodes * w).sum(-1) / ww
    wl = spec.head_label(writer)
    worst = 0.0
    for backend in backends:
        res = ef.attribute(model, tokens, writers=[wl], backend=backend)
        checks = {
            "dla next": (res.dla.reshape(B, P, -1).permute(2, 0, 1)[:, :, :-1], ref_next),
            "dla fixed": (ef.attribute(model, tokens, writers=[wl], targets=5, backend=backend)
                          .dla.reshape(B, P, -1).permute(2, 0, 1), ref_fixed),
            "dla logit diff": (ef.attribute(model, tokens, writers=[wl], targets=7, incorrect=3, backend=backend)
                               .dla.reshape(B, P, -1).permute(2, 0, 1), ref_diff),
            "pr": (res.pr[..., 0].permute(2, 0, 1), pr_ref),
        }
        rp = torch.stack([cache[points[k]] for k in res.resid_labels]).double()
        checks["resid pr"] = (res.resid_pr[..., 0].permute(2, 0, 1), (rp * w).sum(-1) / ww)
        # downstream from the block wiring the model's config states: later-layer heads; MLPs of later
        # layers, and of the writer's own layer unless attention and MLP run in parallel
        writer_layer, H = writer // spec.n_heads, spec.n_heads
        parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
        down = torch.tensor([i // H > writer_layer for i in range(L * H)]
                            + [(l > writer_layer if parallel else l >= writer_layer) for l in range(len(mlps))])
        assert torch.equal(res.downstream[:, 0].cpu(), down), "downstream nodes differ from the block wiring"
        ref_adjusted = ref_next[writer] * (1 + (pr_ref[down][:, :, :-1]).sum(0))
        checks["adjusted dla"] = (res.adjusted_dla[:, :-1, 0], ref_adjusted)
        for name, (ours, ref) in checks.items():
            e = rel_err(ours, ref)
            record_error(f"{label}: {name}", dtype, backend, e)
            worst = max(worst, e)
            assert e <= tol, f"{label} {backend} {name}: rel err {e:.2e} > {tol:.0e}"
    kinds = ("post",) if spec.parallel_blocks or not spec.has_mlps else ("mid", "post")
    assert res.resid_labels == ["resid_pre0"] + [f"resid_{k}{l}" for l in range(L) for k in kinds]
    if spec.parallel_blocks:  # MLP_l reads the stream before layer l's heads write: not downstream
        mlp = res.node_labels.index(f"MLP{writer // spec.n_heads}")
        assert not bool(res.downstream[mlp, 0])
    return worst
