"""No hidden state: a call's result and code path never depend on earlier calls, and library calls
change no process-wide setting (matplotlib backend, TF32 flags, reloaded modules, cached checks)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import erasure_fast as ef


def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend survives a scan report and the paper's figures: set "pdf" first, find
    "pdf" after, and pyplot never imported."""
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import matplotlib
matplotlib.use("pdf")
import numpy as np
import erasure_fast as ef
from erasure_fast import paper
from conftest import build_model
model = build_model(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64)
tokens = np.random.default_rng(0).integers(0, 50, size=(6, 16)).astype(np.int64)
res = ef.scan(model, tokens, out_dir={str(tmp_path / 'scan')!r}, progress=False)
assert "heatmap_pr.png" in res.files
paper.fig1_fig2(res, "L0H1", out_dir={str(tmp_path / 'paper')!r})
import torch
paper.causal_check(model, torch.from_numpy(tokens[:2]), "L0H1", ["L1H0", "L1H2"], out_path={str(tmp_path / 'fig3.png')!r})
from erasure_fast.bench import report
report.plots([dict(workload="K1", status="ok", shape="s", provider="p", n_tokens=8, tokens_per_s=1.0,
                   speedup_vs_tl=1.0, peak_extra_mib=1.0)], {str(tmp_path / 'bench')!r})
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["pdf", "False"], proc.stdout
    for png in ("scan/heatmap_pr.png", "paper/paper_fig2_node_pr.png", "fig3.png", "bench-tokens_per_s.png"):
        assert (tmp_path / png).stat().st_size > 0, png


class _Recorder:
    """Stands in for torch.backends.cuda.matmul and records every attribute read or write."""

    def __init__(self):
        object.__setattr__(self, "seen", [])

    def __getattr__(self, name):
        self.seen.append(("get", name))
        return False

    def __setattr__(self, name, value):
        self.seen.append(("set", name))


def test_head_space_tables_neither_read_nor_flip_the_global_tf32_flag(monkeypatch):
    """The Triton DLA path's table matmuls used to switch torch.backends.cuda.matmul.allow_tf32 off and
    on around themselves (on CUDA). They now compute in float64 and round once: exact fp32 whatever the
    flag says, and the flag is never touched."""
    pytest.importorskip("triton")
    from erasure_fast.kernels import dla_table as kd

    rec = _Recorder()
    monkeypatch.setattr(torch.backends.cuda, "matmul", rec)
    g = torch.Generator().manual_seed(0)
    W_O = torch.randn(5, 8, 40, generator=g)
    rows = torch.randn(7, 40, generator=g) + 0.3
    a = kd.head_space_rows(W_O, rows, True)
    u = kd.head_space_fixed(W_O, rows, True)
    G = kd.head_gram(W_O)
    assert rec.seen == []
    c = (rows.double() - rows.double().mean(-1, keepdim=True))
    want = torch.einsum("nhd,rd->rnh", W_O.double(), c).float()
    assert torch.equal(a, want) and torch.equal(u, want.permute(1, 2, 0).contiguous())
    assert torch.equal(G, torch.bmm(W_O.double(), W_O.double().transpose(1, 2)).float())


def test_triton_kernels_are_never_reloaded(monkeypatch):
    pytest.importorskip("triton")
    from erasure_fast.backends import triton as tb
    from erasure_fast.kernels import dla_table, fused_attribution, triton_common

    before = (fused_attribution, dla_table, triton_common)
    flipped = "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1"
    devices = tb.DEVICES
    monkeypatch.setenv("TRITON_INTERPRET", flipped)  # a later change of the variable reloads nothing
    tb.available()
    assert tb.DEVICES == devices  # the kernels' real decoration decides, not the variable's new value
    import erasure_fast.kernels.dla_table as d2
    import erasure_fast.kernels.fused_attribution as f2
    import erasure_fast.kernels.triton_common as c2

    assert (f2, d2, c2) == before and sys.modules["erasure_fast.kernels.fused_attribution"] is before[0]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    not ef.available_backends()["cpp"].available, reason="C++ extension not built"))])
def test_a_nan_tensor_at_a_reused_address_is_still_caught(backend):
    """The finiteness check used to cache "finite" by (data_ptr, version, shape, ...) for large tensors
    without holding them, so a NaN tensor allocated where a checked one had been skipped the check."""
    T, N, H, D = 4096, 4, 64, 32  # z: 1M values, the size the old cache applied to
    W_O, dirs, scale = torch.randn(N, H, D), torch.randn(9, D), torch.ones(T)
    ids = torch.randint(0, 9, (T,))
    addresses = set()
    for attempt in range(4):
        z = torch.from_numpy(np.random.default_rng(attempt).standard_normal((T, N, H)).astype(np.float32))
        ef.fused_attribution(z, W_O, dirs, scale, [], direction_ids=ids, backend=backend)
        addresses.add(z.data_ptr())
        del z
        bad = np.random.default_rng(10 + attempt).standard_normal((T, N, H)).astype(np.float32)
        bad[T - 1, N - 1, H - 1] = np.nan
        z = torch.from_numpy(bad)  # often at the address just freed
        with pytest.raises(ValueError, match=r"z contains non-finite values \(first at index \[4095, 3, 63\]\)"):
            ef.fused_attribution(z, W_O, dirs, scale, [], direction_ids=ids, backend=backend)
        del z, bad


def test_model_spec_follows_replaced_and_edited_weights():
    """The per-model spec cache is keyed by the parameter objects themselves (held weakly) and their
    versions, not by addresses: a parameter replaced by a new one allocated where the old one was
    (same address, version 0 -- which an address-keyed cache took for "unchanged") or an in-place
    edit gives a fresh spec; unchanged weights give the very same tensors back."""
    from conftest import build_model

    model = build_model(n_layers=2, n_heads=3, d_head=4, d_model=12, d_mlp=16, d_vocab=23)
    first = ef.model_spec(model)
    assert ef.model_spec(model) is first and ef.model_spec(model).directions is first.directions
    old_dirs, old_W_O = first.directions.clone(), first.W_O.clone()
    # the parameter that holds layer 0's W_O (named per TransformerLens version)
    name = next(n for n, p in model.named_parameters()
                if (n.endswith("blocks.0.attn.W_O")) or ("layers.0." in n and ".attn." in n and ".o." in n and n.endswith("weight")))
    owner_name, attr = name.rsplit(".", 1)
    owner = model.get_submodule(owner_name)
    values, address = getattr(owner, attr).detach().clone(), getattr(owner, attr).data_ptr()
    setattr(owner, attr, torch.nn.Parameter(torch.zeros(1)))  # the old parameter is freed here
    replacement = torch.nn.Parameter(values * 3.0)  # allocated now: typically at the freed address
    setattr(owner, attr, replacement)
    second = ef.model_spec(model)
    assert torch.allclose(second.W_O[:3], old_W_O[:3] * 3.0) and torch.equal(second.W_O[3:], old_W_O[3:]), \
        f"stale spec (replacement at the old address: {replacement.data_ptr() == address})"
    W_U_param = next(p for p in model.parameters()
                     if p.shape in (first.W_U.shape, first.W_U.T.shape) and torch.equal(
                         p.detach().reshape(-1).sort().values, first.W_U.reshape(-1).sort().values))
    with torch.no_grad():
        W_U_param.mul_(2.0)  # in place: the version counter moves
    third = ef.model_spec(model)
    assert third is not second and torch.allclose(third.directions, old_dirs * 2.0)
