"""Scans across processes: 2 gloo ranks under torchrun, and a real SIGKILL followed by --resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from erasure_fast.scanning import checkpoint as ckpt
from conftest import run_cli, write_tl_checkpoint

DIMS = dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=50, n_ctx=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    write_tl_checkpoint(root / "model", DIMS, seed=11)
    rng = np.random.default_rng(5)
    np.save(root / "tokens.npy", rng.integers(0, 50, size=(40, 16)).astype(np.int32))
    return root


cli = run_cli


def scan_args(root, out, *extra):
    return ["scan", "--model", root / "model", "--corpus", root / "tokens.npy", "--out", out,
            "--batch-size", "3", "--no-progress", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(setup):
    single = cli(*scan_args(setup, setup / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "erasure_fast.cli", *map(str, scan_args(setup, setup / "dist"))]
    dist = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert dist.returncode == 0, dist.stderr[-3000:]
    # each rank checkpointed its own disjoint share of the 14 batches
    parts = [ckpt.load(str(setup / "dist" / "checkpoint" / f"rank{r}-of-2.npz"))[1] for r in (0, 1)]
    assert [p["rows"] for p in parts] == [21, 19]
    a = pd.read_csv(setup / "single" / "summary.csv")
    b = pd.read_csv(setup / "dist" / "summary.csv")
    exact = [c for c in a.columns if c in ("count", "nan", "underflow", "overflow") or c.startswith(("q", "median"))]
    pd.testing.assert_frame_equal(a[["kind", "node", "writer"] + exact], b[["kind", "node", "writer"] + exact])
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a["std"], b["std"], rtol=1e-9, atol=1e-12)
    import json

    sa = json.load(open(setup / "single" / "summary.json"))
    sb = json.load(open(setup / "dist" / "summary.json"))
    assert sb["meta"]["world_size"] == 2 and sb["meta"]["tokens"] == sa["meta"]["tokens"] == 40 * 16
    assert sa["top_examples"] == sb["top_examples"]


def test_sigkill_then_resume_is_bit_identical(setup):
    full = cli(*scan_args(setup, setup / "full", "--checkpoint-every", "1"))
    assert full.returncode == 0, full.stderr[-3000:]
    out = setup / "killed"
    ck = out / "checkpoint" / "rank0-of-1.npz"
    proc = subprocess.Popen([sys.executable, "-m", "erasure_fast.cli", *map(str, scan_args(setup, out, "--checkpoint-every", "1"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = ckpt.load(str(ck)) if ck.exists() else None
        if found is not None and found[1]["next_batch"] >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.load(str(ck))[1]["next_batch"]
    resumed = cli(*scan_args(setup, out, "--checkpoint-every", "1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, ref_meta = ckpt.load(str(setup / "full" / "checkpoint" / "rank0-of-1.npz"))
    got, meta = ckpt.load(str(ck))
    assert meta["tokens"] == ref_meta["tokens"] == 640, killed_at
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert not [f for f in os.listdir(out / "checkpoint") if f.startswith(".tmp-")]
