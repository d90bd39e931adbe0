"""The paper's analyses (`erasure_fast.paper`) on every decoder-only family of TransformerLens 4's
adapter registry (tests/hf_families.py: tiny random Hugging Face models built offline), fp32, default
backend, writer L0H1 and erasers L1H0 + L1H2 on 2 x 9 tokens. Each analysis either

- runs, and its numbers match an independent reference computed with TransformerLens's own forward
  passes and cache of the same family:
    fig 1 / 2  residual and node PR  vs the cached hook_resid_* / head results / hook_mlp_out;
    fig 3      the patched run       vs TransformerLens's forward with the writer's share of the stream
               removed from the value input of every head of the erasers' layer (attn.v.hook_in; the
               authors' patch) -- and, for ``method="erasers"``, with every other head's output kept
               clean; the share measured (the stream after the writer's attention with K more of
               the writer, a post-norm's scale frozen), mapped through ln1 with its scale frozen (its
               weight fitted from the cache: hook_out on hook_normalized) and the measured ratio of
               the value input to ln1's output (Falcon-H1's attention_in_multiplier);
    fig 4      resample ablation     vs ``logit_attrs``, under the clean final scale, of the head's output
               at the last position with the input of the q/k/v projections (and of an output gate)
               there (attn.{q,k,v,gate}.hook_in) taken from the donor run (the authors' method; a
               one-row corpus makes the donor known),
               and for ``method="z_swap"`` of the head's output on the donor;
    fig 5      V-composition DLA     vs ``logit_attrs`` of the change in the erasers' values (same
               position) / outputs (attention-aware) in that fig 3 reference run (patch K-fold, / K);
    fig 8      BOS split             vs the cached pattern at position 0 times the value there, and at
               positions >= 1 times theirs (times the head's output gate where it has one), PR of the
               sum of every head of the erasers' layer, last position dropped;
- or is refused with `erasure_fast.UnsupportedModelError` before any forward pass, with the message
  `erasure_fast.paper.support.paper_support_problem` gives (naming the family and why). The facts behind
  the refusals are checked here too: the families listed as having a head output other than pattern x
  values are exactly those where TransformerLens's cache shows it, and "mixes heads" exactly where one
  head's output moves with another key/value head's values.

Families `model_spec` refuses are refused by every analysis ("refused: <why>"); where TransformerLens's
own forward fails, every analysis must fail too ("upstream: ..."). Statuses go to
tests/family_results.py (PAPER_RESULTS[arch][fig1_2 / fig3 / fig4 / fig5 / fig8]).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import erasure_fast as ef
from conftest import record_error, rel_err
from erasure_fast import paper
from erasure_fast.paper.causal import causal_runs
from erasure_fast.models.layout import HEAD_OUTPUT_NOT_PATTERN_TIMES_VALUES
from erasure_fast.paper.support import paper_support_problem
from erasure_fast.paper.value_path import kv_group
from family_results import PAPER_RESULTS
from hf_families import VOCAB, boot_bridge, registry_families, save_family
from tl_reference import forward_calls

REGISTRY = registry_families()
WRITER, ERASERS = "L0H1", ["L1H0", "L1H2"]
KEYS = {"fig1_2": "fig1", "fig3": "fig3", "fig4": "fig4", "fig5": "fig5", "fig8": "fig8"}  # result key -> analysis
TOL = 2e-5  # fp32, relative to the largest reference value (observed: <= 2e-6)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the models are tiny, and a second thread only waits on the other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _short(message: str, family: str) -> str:
    """A refusal's reason in a few words: the message without the family, analysis and details."""
    text = " ".join(message.split())
    text = text[len(family) + 2:] if text.startswith(family + ": ") else text
    text = text.split(" cannot run: ", 1)[-1].split("; ")[0].split(" -- ")[0]
    if len(text) > 110 and text.find(" (") >= 40:
        text = text[:text.find(" (")]
    return text if len(text) <= 110 else text[:107].rsplit(" ", 1)[0] + "..."


def _check(label: str, ours, ref, worst: dict) -> None:
    ours, ref = (torch.as_tensor(np.array(x, dtype=np.float64)) if not isinstance(x, torch.Tensor) else x.detach()
                 for x in (ours, ref))
    e = rel_err(ours, ref)
    record_error(f"paper {label}", torch.float32, "auto", e)
    worst[label] = max(worst.get(label, 0.0), e)
    assert e <= TOL, f"{label}: rel err {e:.2e} > {TOL:.0e}"


def _pr(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a, w = a.double(), w.double()
    return (a * w).sum(-1) / (w * w).sum(-1)


def _logit_attrs(model, cache, stack, tokens, incorrect=None):
    """TransformerLens's ``cache.logit_attrs``; without a final norm (GPT-1) its definition: stack . W_U[:, t]."""
    if "ln_final.hook_scale" in cache:
        return cache.logit_attrs(stack, tokens, incorrect_tokens=incorrect)
    directions = model.W_U.T[tokens]
    if incorrect is not None:
        directions = directions - model.W_U.T[incorrect]
    return (stack * directions).sum(-1)


def _run(model, tokens, hooks, keep=()):
    """TransformerLens forward with ``hooks``; returns the activations named in ``keep``."""
    kept = {}

    def keeper(name):
        def hook(t, hook=None):
            kept[name] = t.detach().clone()
        return hook

    with torch.no_grad(), warnings.catch_warnings():
        # a frozen norm scale is an edit of hook_scale, which TransformerLens announces each time
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        model.run_with_hooks(tokens, fwd_hooks=list(hooks) + [(k, keeper(k)) for k in keep])
    return kept


def _replace(value):
    return lambda t, hook=None: value.to(t).clone()


def _last_position_from(donor: torch.Tensor):
    """A hook putting ``donor``'s last position into the activation's."""
    def hook(t, hook=None):
        t = t.clone()
        t[:, -1] = donor[:, -1].to(t)
        return t
    return hook


def _groups(cache, spec, layer: int):
    """(n_kv, the key/value head each query head reads per the cached z = pattern x values, or None
    when no head's output is pattern x values)."""
    v = cache[f"blocks.{layer}.attn.hook_v"].double()
    A = cache[f"blocks.{layer}.attn.hook_pattern"].double()
    z = cache[f"blocks.{layer}.attn.hook_z"].double()
    n_kv = v.shape[2]
    found = []
    for h in range(spec.n_heads):
        errs = [float((torch.einsum("bqp,bpd->bqd", A[:, h], v[:, :, g]) - z[:, :, h]).abs().max()) for g in range(n_kv)]
        g = int(np.argmin(errs))
        if errs[g] > 1e-5 * float(z[:, :, h].abs().max()):
            return n_kv, None
        found.append(g)
    return n_kv, found


def _mixes_heads(model, tokens, cache, spec, layer: int, n_kv: int) -> bool:
    """Whether a head's output moves when only another key/value head's values change."""
    if n_kv < 2:
        return False
    other = 1 if kv_group(spec, 0, n_kv) == 0 else 0

    def nudge(v, hook=None):
        v = v.clone()
        v[:, :, other] += 1.0
        return v

    z = _run(model, tokens, [(f"blocks.{layer}.attn.hook_v", nudge)], [f"blocks.{layer}.attn.hook_z"])[f"blocks.{layer}.attn.hook_z"]
    clean = cache[f"blocks.{layer}.attn.hook_z"]
    return float((z[:, :, 0] - clean[:, :, 0]).abs().max()) > 1e-6 * float(clean.abs().max())


def _frozen_norm_map(cache, name: str):
    """The map u -> c(u) / s * weight of norm ``name`` (e.g. "blocks.1.ln1") with its scale s frozen,
    fitted from TransformerLens's cache of the clean run: centring from hook_normalized * hook_scale
    against hook_in, the weight by least squares of hook_out on hook_normalized per dimension."""
    x, s = cache[f"{name}.hook_in"].double(), cache[f"{name}.hook_scale"].double()
    n, y = cache[f"{name}.hook_normalized"].double(), cache[f"{name}.hook_out"].double()
    c = x - x.mean(-1, keepdim=True)
    centres = float((n * s - c).abs().max()) < float((n * s - x).abs().max())
    N, Y = n.reshape(-1, n.shape[-1]), y.reshape(-1, y.shape[-1])
    Nc, Yc = N - N.mean(0), Y - Y.mean(0)
    weight = (Nc * Yc).sum(0) / (Nc * Nc).sum(0)
    assert float((Yc - Nc * weight).abs().max()) <= 1e-5 * float(Y.abs().max()), f"{name} is no affine map of hook_normalized"
    return lambda u: ((u - u.mean(-1, keepdim=True)) if centres else u) / s * weight


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """The scalar m with a = m b (least squares), checked."""
    a, b = a.detach().double(), b.detach().double()
    m = float((a * b).sum() / (b * b).sum())
    assert float((a - m * b).abs().max()) <= 1e-5 * float(a.abs().max()), "not a multiple"
    return m


def _fig3_reference(model, spec, tokens, cache, w: int, es: list, scale: float = 1.0):
    """TransformerLens's own forward with the writer's share of the stream removed from the erasers'
    value input (``scale`` times that), norm scales frozen to the clean run and every other head's
    output kept clean. Returns the activations of that run."""
    H = spec.n_heads
    wl, wh = divmod(w, H)
    layer = es[0] // H
    # the writer's share of the stream, measured: the stream after its attention with more of the writer
    # (a post-norm on the attention output keeps its clean scale, so the stream is linear in the writer)
    after = f"blocks.{wl}.hook_resid_mid" if f"blocks.{wl}.hook_resid_mid" in cache else f"blocks.{wl}.hook_resid_post"

    def amplify_writer(z, hook=None):  # linear in the writer: K more of it shows its share K-fold, above rounding
        z = z.clone()
        z[:, :, wh] *= 1 + K
        return z

    K = 1000.0
    hooks = [(f"blocks.{wl}.attn.hook_z", amplify_writer)]
    if hasattr(model.blocks[wl], "ln1_post"):
        hooks.append((f"blocks.{wl}.ln1_post.hook_scale", _replace(cache[f"blocks.{wl}.ln1_post.hook_scale"])))
    share = (_run(model, tokens, hooks, [after])[after].double() - cache[after].double()) / K
    # its share of the erasers' value input: through ln1 (scale frozen), times what the attention
    # multiplies its input by (measured from the cache)
    v_in = cache[f"blocks.{layer}.attn.v.hook_in"]
    if hasattr(model.blocks[layer], "ln1"):
        x = _frozen_norm_map(cache, f"blocks.{layer}.ln1")(share) * _ratio(v_in, cache[f"blocks.{layer}.ln1.hook_out"])
    else:  # the attention reads the stream itself
        x = share * _ratio(v_in, cache[f"blocks.{layer}.hook_resid_pre"])
    others = [h for h in range(H) if layer * H + h not in es]
    clean_z = cache[f"blocks.{layer}.attn.hook_z"]

    def keep_others(z, hook=None):
        z = z.clone()
        z[:, :, others] = clean_z[:, :, others].to(z)
        return z

    names = [f"blocks.{layer}.attn.hook_{k}" for k in ("q", "k", "v", "z")]
    names += [k for k in cache.keys() if k.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))]
    ref = _run(model, tokens, [(f"blocks.{layer}.attn.v.hook_in", _replace(v_in.double() - scale * x)),
                               (f"blocks.{layer}.attn.hook_z", keep_others)], names)
    for k in ("q", "k"):  # only the values changed
        assert torch.equal(ref[f"blocks.{layer}.attn.hook_{k}"], cache[f"blocks.{layer}.attn.hook_{k}"]), k
    return ref


def _fig8_reference(spec, cache, w: int, n_kv: int, gated: bool):
    """The writer's BOS part and the rest from the cache, each summed directly: its pattern at key 0
    times its key/value head's value at 0, and at keys >= 1 times theirs (times its output gate,
    z / (pattern x values), where it has one)."""
    wl, wh = divmod(w, spec.n_heads)
    A = cache[f"blocks.{wl}.attn.hook_pattern"][:, wh].double()  # [B, Pq, Pk]
    v = cache[f"blocks.{wl}.attn.hook_v"][:, :, kv_group(spec, wh, n_kv)].double()  # [B, Pk, dh]
    bos, rest = A[:, :, :1] @ v[:, :1], A[:, :, 1:] @ v[:, 1:]
    if gated:
        gate = cache[f"blocks.{wl}.attn.hook_z"][:, :, wh].double() / (A @ v)
        bos, rest = bos * gate, rest * gate
    return bos, rest


def _table_stats(values: torch.Tensor):
    """(median, 12.5 %, 87.5 %) of the values, NaN skipped (the authors' pandas / seaborn statistics)."""
    v = values.detach().reshape(-1).double().numpy()
    v = v[~np.isnan(v)]
    return [np.median(v), np.quantile(v, 0.125), np.quantile(v, 0.875)]


def _analyse(model, arch: str, keys=tuple(KEYS)):
    """Run the analyses ``keys`` on ``model`` (of family ``arch``) and check each against its reference
    or its refusal. Returns ({key: status}, {check: largest relative error})."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, VOCAB, (2, 9), generator=g)
    corpus = torch.randint(2, VOCAB, (1, 9), generator=g).numpy()  # one row: fig 4's donor is known
    correct, incorrect = [5, 6], [7, 8]
    calls = forward_calls(model)  # the embedding runs in every forward pass, not in a norm probe
    runs = {
        "fig1_2": lambda: paper.fig1_fig2(tokens, WRITER, model=model),
        "fig3": lambda: (causal_runs(model, tokens, WRITER, ERASERS),
                         causal_runs(model, tokens, WRITER, ERASERS, method="erasers")),
        "fig4": lambda: (paper.resample_ablation(model, tokens, correct, incorrect, WRITER, corpus),
                         paper.resample_ablation(model, tokens, correct, incorrect, WRITER, corpus, method="z_swap",
                                                 n_samples=2)),
        "fig5": lambda: (paper.v_composition(model, tokens, WRITER, ERASERS, start_pos=0),
                         paper.v_composition(model, tokens, WRITER, ERASERS, start_pos=0, attention_aware=True)),
        "fig8": lambda: paper.bos_split(model, tokens, WRITER, ERASERS),
    }
    runs = {k: v for k, v in runs.items() if k in keys}
    status, worst = {}, {}
    try:
        spec = ef.model_spec(model)
    except ef.UnsupportedModelError as e:  # every analysis refuses, naming the family, before any work
        for key, run in runs.items():
            with pytest.raises(ef.UnsupportedModelError) as info:
                run()
            assert str(info.value).startswith(arch), info.value
            status[key] = "refused: " + _short(str(e), arch)
        assert not calls, "refused after a forward pass"
        return status, worst
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
    except Exception as e:  # TransformerLens's own forward fails on this family: ours fails too, no numbers
        for key, run in runs.items():
            with pytest.raises(Exception):
                run()
            status[key] = f"upstream: TransformerLens's own forward fails ({type(e).__name__})"
        return status, worst
    H = spec.n_heads
    w, es = spec.parse_head(WRITER), [spec.parse_head(e) for e in ERASERS]
    # the facts behind the refusals: head outputs that are not pattern x values, heads that mix
    n_kv, groups = _groups(cache, spec, 0)
    listed = HEAD_OUTPUT_NOT_PATTERN_TIMES_VALUES.get(arch)
    assert (groups is None) == (listed is not None), f"{arch}: z = pattern x values is {groups is not None}"
    if groups is not None:  # grouped-query attention: the library's key/value head of each query head
        assert groups == [kv_group(spec, h, n_kv) for h in range(H)], groups
    mixes = _mixes_heads(model, tokens, cache, spec, 0, n_kv)
    assert mixes == bool(listed and listed[0]), f"{arch}: a head's output moves with other heads' values: {mixes}"
    calls.clear()
    for key, run in runs.items():
        problem = paper_support_problem(model, KEYS[key], WRITER, ERASERS)
        if problem is not None:
            with pytest.raises(ef.UnsupportedModelError) as info:
                run()
            assert str(info.value) == problem and problem.startswith(arch), info.value
            assert not calls, f"{key} refused after a forward pass"
            status[key] = "refused: " + _short(problem, arch)
    stack = cache.stack_head_results(layer=-1, apply_ln=False)  # [L*H, B, P, D]
    r_w = stack[w]
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    points = {"resid_pre0": "blocks.0.hook_resid_pre"}
    points.update({f"resid_{k}{l}": f"blocks.{l}.hook_resid_{k}" for l in range(spec.n_layers) for k in ("mid", "post")})
    if "fig1_2" in runs and "fig1_2" not in status:
        resid, nodes = runs["fig1_2"]()
        ref = [_table_stats(_pr(cache[points[n]], r_w)) for n in resid.node]
        _check("fig1 resid PR", resid[["median", "q0.125", "q0.875"]].to_numpy(), ref, worst)
        vectors = {spec.head_label(i): stack[i] for i in range(spec.n_heads_total)}
        vectors.update({f"MLP{l}": cache[f"blocks.{l}.hook_mlp_out"] for l in range(spec.n_layers)})
        ref = [_table_stats(_pr(vectors[n], r_w)) for n in nodes.node]
        _check("fig2 node PR", nodes[["median", "q0.125", "q0.875"]].to_numpy(), ref, worst)
        status["fig1_2"] = "pass"
    layer, wl = es[0] // H, w // H
    if "fig3" in runs and "fig3" not in status:
        raw_w = cache[f"blocks.{wl}.attn.hook_z"][:, :, w % H] @ model.W_O[wl, w % H]  # PR: any common scale
        layer_heads = list(range(layer * H, (layer + 1) * H))
        for (clean, patched), patched_heads in zip(runs["fig3"](), (layer_heads, es)):
            ref = _fig3_reference(model, spec, tokens, cache, w, patched_heads)
            for e in patched_heads:
                _check("fig3 head PR clean", clean.pr[..., e, 0], _pr(stack[e], r_w), worst)
                z_e = ref[f"blocks.{layer}.attn.hook_z"][:, :, e - layer * H]
                _check("fig3 head PR patched", patched.pr[..., e, 0], _pr(z_e @ model.W_O[layer, e - layer * H], raw_w), worst)
            _check("fig3 resid PR patched", patched.resid_pr[..., 0].permute(2, 0, 1),
                   torch.stack([_pr(ref[points[n]], r_w) for n in patched.resid_labels]), worst)
        status["fig3"] = "pass"
    if "fig4" in runs and "fig4" not in status:
        at_last, swapped = runs["fig4"]()
        grid = lambda ids: torch.tensor(ids)[:, None].expand(tokens.shape)  # noqa: E731
        clean_ref = _logit_attrs(model, cache, r_w[None], grid(correct), grid(incorrect))[0, :, -1]
        donor_tokens = torch.from_numpy(corpus).long()
        with torch.no_grad():
            _, donor = model.run_with_cache(donor_tokens)
        # the authors': the head's q/k/v input (and an output gate's) at the last position is the donor's
        # (every head's here; only this head's output is read), its output there under the clean final scale
        qkv_in = [f"blocks.{wl}.attn.{k}.hook_in" for k in ("q", "k", "v", "gate")
                  if f"blocks.{wl}.attn.{k}.hook_in" in model.hook_dict]
        ref_z = _run(model, tokens, [(n, _last_position_from(donor[n])) for n in qkv_in], [f"blocks.{wl}.attn.hook_z"])
        per_z = _ratio(stack[w], cache[f"blocks.{wl}.attn.hook_z"][:, :, w % H] @ model.W_O[wl, w % H])  # multipliers
        r_last = per_z * ref_z[f"blocks.{wl}.attn.hook_z"][:, :, w % H].double() @ model.W_O[wl, w % H].double()
        at_last_ref = _logit_attrs(model, cache, r_last[None].to(r_w), grid(correct), grid(incorrect))[0, :, -1]
        r_donor = donor.stack_head_results(layer=-1, apply_ln=False)[w].expand_as(r_w)
        swapped_ref = _logit_attrs(model, cache, r_donor[None], grid(correct), grid(incorrect))[0, :, -1]
        for label, table, ref in (("fig4", at_last, at_last_ref), ("fig4 z_swap", swapped, swapped_ref)):
            _check(f"{label} clean DLA", table.clean_dla.to_numpy(), clean_ref, worst)
            _check(f"{label} resampled DLA", table[["resampled_median", "resampled_q0.125", "resampled_q0.875"]].to_numpy(),
                   ref[:, None].expand(-1, 3), worst)
        status["fig4"] = "pass"
    if "fig5" in runs and "fig5" not in status:
        (same, _), (aware, _) = runs["fig5"]()
        K = 1000.0  # the patch is linear: a K-fold one shows the change in the values K-fold, above rounding
        ref = _fig3_reference(model, spec, tokens, cache, w, es, scale=K)
        dv = (cache[f"blocks.{layer}.attn.hook_v"].double() - ref[f"blocks.{layer}.attn.hook_v"].double()) / K
        dz = (cache[f"blocks.{layer}.attn.hook_z"].double() - ref[f"blocks.{layer}.attn.hook_z"].double()) / K
        heads = [e - layer * H for e in es]
        # what each eraser adds to the stream per unit of z: TransformerLens's head result over z W_O
        W_O = model.W_O[layer].double() * _ratio(stack[es[0]], cache[f"blocks.{layer}.attn.hook_z"][:, :, heads[0]] @ model.W_O[layer, heads[0]])
        img_same = sum(dv[:, :, kv_group(spec, h, n_kv)] @ W_O[h] for h in heads)
        img_aware = sum(dz[:, :, h] @ W_O[h] for h in heads)
        writer_ref = _logit_attrs(model, cache, r_w[None], nxt)[0, :, :-1].reshape(-1)
        for label, table, img in (("fig5 same position", same, img_same), ("fig5 attention-aware", aware, img_aware)):
            _check(label + " writer DLA", table.writer_dla.to_numpy(), writer_ref, worst)
            _check(label + " composition DLA", table.v_composition_dla.to_numpy(),
                   _logit_attrs(model, cache, img[None].to(r_w), nxt)[0, :, :-1].reshape(-1), worst)
        status["fig5"] = "pass"
    if "fig8" in runs and "fig8" not in status:
        table = runs["fig8"]()
        z_bos, z_rest = _fig8_reference(spec, cache, w, n_kv, gated=listed is not None)
        W_O = model.W_O.detach().double()  # PR and shares: any common scale of the heads' outputs
        r_bos, r_rest = z_bos @ W_O[wl, w % H], z_rest @ W_O[wl, w % H]
        r_all = cache[f"blocks.{wl}.attn.hook_z"][:, :, w % H].double() @ W_O[wl, w % H]
        r_sum = sum(cache[f"blocks.{layer}.attn.hook_z"][:, :, h].double() @ W_O[layer, h] for h in range(H))
        pr_rest = _pr(r_sum, r_rest)
        pr_rest[:, 0] = 0  # position 0 sees only itself: no rest, PR 0 as in the authors' sum
        for column, ref_pt in (("pr_bos_median", _pr(r_sum, r_bos)), ("pr_rest_median", pr_rest),
                               ("bos_share_median", (r_bos * r_all).sum(-1) / (r_all * r_all).sum(-1))):
            _check(f"fig8 {column}", table[column].to_numpy(), np.median(ref_pt[:, :-1].detach().numpy(), axis=0), worst)
        status["fig8"] = "pass"
    assert set(status) == set(runs), status
    return {k: status[k] for k in runs}, worst


@pytest.mark.parametrize("arch", REGISTRY)
def test_paper_analyses_on_family(arch, tmp_path):
    model = boot_bridge(save_family(arch, str(tmp_path / "model")))
    status, worst = _analyse(model, arch)
    PAPER_RESULTS[arch] = status
    print(f"{arch}: " + ", ".join(f"{k}={v}" for k, v in status.items()) + "; largest rel err "
          + ", ".join(f"{k} {e:.1e}" for k, e in sorted(worst.items(), key=lambda kv: -kv[1])[:2]))


def _save_variant(arch: str, folder: str, **config) -> str:
    """`save_family` with config attributes overridden (e.g. multipliers away from 1)."""
    import transformers

    from hf_families import tiny_config, word_tokenizer

    cfg = tiny_config(arch)
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_attention_multipliers_reach_the_value_input(tmp_path):
    """Falcon-H1 scales the attention's input and output (attention_in / attention_out_multiplier, 1 in
    the fixture): figs 3, 5 and 8 still match TransformerLens's own forward with them away from 1."""
    arch = "FalconH1ForCausalLM"
    if arch not in REGISTRY:
        pytest.skip(f"{arch} is not in this TransformerLens / transformers")  # pragma: no cover
    model = boot_bridge(_save_variant(arch, str(tmp_path / "m"), attention_in_multiplier=0.7, attention_out_multiplier=1.6))
    assert model.original_model.config.attention_in_multiplier == 0.7
    status, _ = _analyse(model, arch, keys=("fig3", "fig5", "fig8"))
    assert status == {"fig3": "pass", "fig5": "pass", "fig8": "pass"}, status


def _refusing_family():
    """A family (and its refused analyses) whose fig 3 / 5 / 8 are refused by layout, if the registry has one."""
    for arch, (mixes, _) in HEAD_OUTPUT_NOT_PATTERN_TIMES_VALUES.items():
        if mixes and arch in REGISTRY:
            return arch
    pytest.skip("no family here mixes heads")  # pragma: no cover


def test_cli_refuses_an_analysis_the_family_cannot_run_before_any_work(tmp_path, monkeypatch, capsys):
    """`erasure-fast paper fig8` on a family whose heads mix: exit 2, one line naming --model, the family
    and why, no forward pass, nothing written; 'all' runs the rest and says what it left out and why."""
    from erasure_fast import cli
    from erasure_fast.paper import cli as paper_cli

    arch = _refusing_family()
    model = boot_bridge(save_family(arch, str(tmp_path / "model")))
    calls = forward_calls(model)  # the embedding runs in every forward pass, not in a norm probe
    capsys.readouterr()  # the fixture's progress bars
    monkeypatch.setattr(paper_cli, "open_paper_model", lambda name, device=None, weights="auto", analysis="all":
                        paper_cli.PaperModel(model, f"tiny {arch}", ERASERS, None, "raw", gelu_4l=False))
    base = ["paper", "--model", "x", "--writer", WRITER, "--erasers", ",".join(ERASERS), "--rows", "2", "--seq-len", "16",
            "--samples", "2", "--corpus", "demo"]
    for analysis in ("fig3", "fig5", "fig8"):
        out = tmp_path / f"out_{analysis}"
        assert cli.main([base[0], analysis, *base[1:], "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"erasure-fast: error: --model: {arch}: fig ") and "\n" not in err, err
        assert err.endswith(paper_support_problem(model, analysis, WRITER, ERASERS).split(": ", 1)[1])
        assert not out.exists() and not calls
    out = tmp_path / "out_all"
    assert cli.main([base[0], "all", *base[1:], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for analysis in ("fig3", "fig5", "fig8"):
        assert f"not run: {analysis}, because {arch}: " in printed
    report = (out / "paper_report.md").read_text()
    assert "not run: fig8" in report and "## Fig. 4" in report and "## Fig. 8" not in report
