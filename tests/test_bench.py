"""The benchmark harness runs end to end on tiny sizes and writes a complete, finite report.
(No speed is asserted: performance lives in benchmarks/results, not in tests.)"""

from __future__ import annotations

import json
import math
import os

import erasure_fast.bench as bench
from erasure_fast.bench import workloads


def test_harness_end_to_end(tmp_path, monkeypatch):
    # a small model shape keeps the run short; the harness code path is the real one
    monkeypatch.setitem(workloads.SHAPES, "tiny", dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=97, n_ctx=64))
    out = bench.run(str(tmp_path), device="cpu", shapes=("tiny",), sizes=[24], repeats=2, budget_s=30,
                    providers=["transformer_lens", "erasure_fast", "torch.compile"], command="test")
    files = out["files"]
    for key in ("json", "csv", "md"):
        assert os.path.getsize(files[key]) > 0
    assert any(k.endswith(".png") for k in files)
    data = json.load(open(files["json"]))
    records = data["results"]
    providers = {r["provider"] for r in records}
    assert any(p.startswith("transformer_lens") for p in providers) and "erasure_fast torch" in providers
    assert {r["workload"] for r in records} == {"K1", "K2n", "K2n_cold", "K2f"}
    for r in records:
        assert r["status"] == "ok", r
        keys = ("median_s", "tokens_per_s") + (("roofline_pct",) if r["workload"] in ("K1", "K2f") else ())
        for key in keys:
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["peak_extra_mib"] is not None and r["peak_extra_mib"] >= 0
        assert r["speedup_vs_tl"] > 0
    roof = data["meta"]["roofline"]
    assert roof["matmul_gflops"]["float32"] > 0 and roof["copy_gbps"] > 0
    md = open(files["md"]).read()
    assert "K1" in md and "speedup vs TL" in md
