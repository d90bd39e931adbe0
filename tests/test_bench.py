"""The benchmark harness: end to end on tiny sizes in its own process (complete, finite report; the
caller's rlimits untouched), correctness before speed (a wrong provider is reported "wrong" and not
timed), and bad arguments refused before any work. (No speed is asserted: performance lives in
benchmarks/results, not in tests.)"""

from __future__ import annotations

import json
import math
import os
import statistics
import resource
import subprocess

import pytest
import torch

import erasure_fast.bench as bench
from erasure_fast.backends import available_backends
from erasure_fast.bench import harness, providers, rounds, workloads

# A small model shape keeps the runs short; the harness code path is the real one.
TINY = dict(n_layers=2, n_heads=3, d_head=8, d_model=24, d_mlp=32, d_vocab=97, n_ctx=64)
needs_cpp = pytest.mark.skipif(not available_backends()["cpp"].available, reason="C++ extension not built")


def test_harness_end_to_end(tmp_path, monkeypatch):
    # started from the repository root, as `make bench` does: the child must still import this very
    # package (with its compiled backend), not the source tree in the working directory
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = bench.run(str(tmp_path), device="cpu", shapes=("tiny",), sizes=[24], repeats=2, budget_s=60, round_budget_s=3,
                    providers=["transformer_lens", "erasure_fast", "torch.compile"], command="test",
                    extra_shapes={"tiny": TINY})
    files = out["files"]
    for key in ("json", "csv", "md"):
        assert os.path.getsize(files[key]) > 0
    assert any(k.endswith(".png") for k in files)
    data = json.load(open(files["json"]))
    assert data["results"] == out["results"] and data["meta"] == out["meta"]
    records = data["results"]
    names = {r["provider"] for r in records}
    assert any(p.startswith("transformer_lens") for p in names) and "erasure_fast torch" in names
    import erasure_fast

    assert data["meta"]["package"] == os.path.dirname(os.path.abspath(erasure_fast.__file__))
    if available_backends()["cpp"].available:
        assert "erasure_fast cpp" in names
    assert {r["workload"] for r in records} == {"K1", "K2n", "K2n_cold", "K2f"}
    for r in records:  # every honest provider passed the reference check, then was timed
        assert r["status"] == "ok", r
        keys = ("median_s", "tokens_per_s") + (("roofline_pct",) if r["workload"] in ("K1", "K2f") else ())
        for key in keys:
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["peak_extra_mib"] is not None and r["peak_extra_mib"] >= 0
        assert r["speedup_vs_tl"] > 0
    roof = data["meta"]["roofline"]
    assert roof["matmul_gflops"]["float32"] > 0 and roof["copy_gbps"] > 0
    md = open(files["md"]).read()
    assert "K1" in md and "speedup vs TL" in md and "float64 reference" in md and "interleaved rounds" in md
    meta = data["meta"]  # the run's conditions and its roofline reference are recorded
    assert meta["conditions"]["before"]["versions"]["torch"] and "loadavg" in meta["conditions"]["after"]
    assert isinstance(meta["disturbed"]["disturbed"], bool) and meta["probes"]
    assert meta["matmul_best_gflops"]["float32"] >= roof["matmul_gflops"]["float32"]
    for r in records:
        if r["workload"] != "K2n_cold":
            assert r["rounds"] >= 2 and r["stop"] in ("converged", "budget", "max rounds"), r
            assert r["speedup_q25"] <= r["speedup_vs_tl"] <= r["speedup_q75"], r
    assert "tiny" not in workloads.SHAPES  # the extra shape lived in the child only
    assert not os.path.exists(tmp_path / "partial-results.json")


@needs_cpp
def test_run_leaves_the_callers_rlimits_alone(tmp_path, capfd):
    before = resource.getrlimit(resource.RLIMIT_AS)
    out = bench.run(str(tmp_path), device="cpu", shapes=["tiny"], sizes=[8], repeats=1, budget_s=30,
                    providers=["erasure_fast cpp"], extra_shapes={"tiny": TINY})
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    # the child did cap its own address space (so a provider exhausting RAM is an "oom" record) ...
    cap = out["meta"]["address_space_cap_bytes"]
    assert cap is not None and cap < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # ... and its progress lines reached our stdout
    assert "K1       tiny" in capfd.readouterr().out
    assert all(r["status"] == "ok" for r in out["results"])


def test_child_failure_is_a_runtime_error_with_its_stderr(tmp_path):
    # passes validation, but the child cannot allocate the inputs of 2**40 tokens and dies
    with pytest.raises(RuntimeError, match=r"exit code 1(.|\n)*can't allocate memory|exit code 1(.|\n)*MemoryError"):
        bench.run(str(tmp_path / "out"), device="cpu", shapes=["tiny"], sizes=[2**40], repeats=1,
                  providers=["erasure_fast torch"], extra_shapes={"tiny": TINY})


def _scaled(make, field: str):
    """A deliberately wrong provider: ``make``'s result with one output multiplied by 1.01."""

    def make_wrong(model, inp, workload):
        honest = make(model, inp, workload)
        if honest is None:
            return None

        def call():
            out = honest.call()
            return out._replace(**{field: getattr(out, field) * 1.01})

        return providers.PreparedWorkload(call, honest.canonical)

    return make_wrong


@needs_cpp
def test_wrong_provider_is_reported_and_not_timed(monkeypatch):
    monkeypatch.setitem(workloads.SHAPES, "tiny", TINY)  # in-process: run_kernels sees the monkeypatch
    monkeypatch.setattr(harness, "CHECK_TOKENS", 100)  # 2 rows of 64 tokens: the check cuts mid-row
    lines: list = []
    wrong = {"cpp, dla x 1.01 (test)": _scaled(providers.backend("cpp"), "dla"),
             "cpp, dots x 1.01 (test)": _scaled(providers.backend("cpp"), "dots")}
    points = harness.run_kernels(["tiny"], [128], torch.device("cpu"), repeats=2, budget_s=60,
                                 round_settings=rounds.RoundSettings(min_rounds=2, budget_s=3),
                                 providers=["transformer_lens", "erasure_fast"], progress=lines.append,
                                 extra_providers=wrong)
    harness.finish(points, {"matmul_gflops": {"float32": 1.0}})
    by = {(p.workload, p.provider): p for p in points}
    workloads_run = ("K1", "K2n", "K2n_cold", "K2f")
    for w in workloads_run:
        p = by[(w, "cpp, dla x 1.01 (test)")]
        assert p.status == "wrong" and "dla rel err 1.0e-02 > 1e-04" in p.note, p
        assert p.times_s == [] and p.median_s is None and p.speedup_vs_tl is None and p.tokens_per_s is None
    # PR is checked on K1 (the only workload with dots); DLA-only workloads of that provider are right
    p = by[("K1", "cpp, dots x 1.01 (test)")]
    assert p.status == "wrong" and p.note.startswith("pr rel err") and p.median_s is None, p
    for w in ("K2n", "K2f"):
        assert by[(w, "cpp, dots x 1.01 (test)")].status == "ok"
    honest = [p for p in points if "(test)" not in p.provider]
    assert {p.provider for p in honest} >= {"erasure_fast torch", "erasure_fast cpp", "erasure_fast cpp + lazy W_U table"}
    assert any(p.provider.startswith("transformer_lens") for p in honest)
    for p in honest:  # the same run, the same inputs: the honest providers pass and are timed
        cold = p.workload == "K2n_cold"
        assert p.status == "ok" and p.median_s > 0 and (len(p.times_s) == 1 if cold else len(p.times_s) >= 2), p
        assert p.speedup_vs_tl > 0 and (cold or p.rounds == len(p.times_s) and p.stop), p
    assert any("cpp, dla x 1.01 (test)" in line and "wrong" in line and "rel err" in line for line in lines)


def test_compare_with_reference_policy():
    nan = float("nan")
    ref = {"dla": torch.tensor([[1.0, nan], [2.0, -4.0]], dtype=torch.float64)}
    compare = harness.compare_with_reference
    assert compare({"dla": ref["dla"].float()}, ref, 1e-4) == ""
    # a value where the reference has no target (TransformerLens's last position) is not compared
    assert compare({"dla": torch.tensor([[1.0, 7.0], [2.0, -4.0]])}, ref, 1e-4) == ""
    assert "non-finite" in compare({"dla": torch.tensor([[nan, nan], [2.0, -4.0]])}, ref, 1e-4)
    assert "non-finite" in compare({"dla": torch.tensor([[1.0, nan], [float("inf"), -4.0]])}, ref, 1e-4)
    assert compare({"dla": ref["dla"] * 1.001}, ref, 1e-4) == "dla rel err 1.0e-03 > 1e-04"
    assert compare({"dla": ref["dla"] * 1.001}, ref, harness.TOLERANCE[torch.bfloat16]) == ""
    assert "shape" in compare({"dla": ref["dla"].T.reshape(1, 4)}, ref, 1e-4)
    assert "pr missing" in compare({"dla": ref["dla"]}, {**ref, "pr": ref["dla"]}, 1e-4)


BAD_ARGUMENTS = [
    ("providers", dict(providers=["nonexistent"]), r"providers \['nonexistent'\] match no provider.*erasure_fast torch"),
    ("providers", dict(providers=["erasure_fast", "nonexistent"]), r"providers \['nonexistent'\]"),
    ("providers", dict(providers=[]), "providers"),
    ("shapes", dict(shapes=("gelu-4l", "nope")), r"unknown shapes \['nope'\].*gelu-4l"),
    ("shapes", dict(shapes=()), "shapes"),
    ("sizes", dict(sizes=[1024, 0]), "sizes"),
    ("sizes", dict(sizes=[-8]), "sizes"),
    ("sizes", dict(sizes=[8.5]), "sizes"),
    ("sizes", dict(sizes=["8"]), "sizes"),
    ("sizes", dict(sizes=[]), "sizes"),
    ("repeats", dict(repeats=0), "repeats"),
    ("repeats", dict(repeats=2.5), "repeats"),
    ("budget_s", dict(budget_s=0), "budget_s"),
    ("budget_s", dict(budget_s=-1.0), "budget_s"),
    ("budget_s", dict(budget_s=float("nan")), "budget_s"),
    ("s1_tokens", dict(s1_tokens=-1), "s1_tokens"),
    ("s1_dtype", dict(s1_dtype="float64"), "s1_dtype must be one of float32, bfloat16, float16"),
    ("dtype", dict(dtype="float64"), "dtype must be one of float32, bfloat16, float16"),
    ("c1_families", dict(c1_families=["llama", "gpt3"], s1_tokens=1024), r"unknown c1_families \['gpt3'\].*gpt_neox"),
    ("c1_families", dict(c1_families=["llama"]), "c1_families .* give s1_tokens > 0"),
    ("device", dict(device="no-such-device"), r"device .*choose from \['cpu'"),
    ("device", dict(device="mps"), r"device 'mps' does not exist here"),
    ("extra_shapes", dict(extra_shapes={"x": dict(n_layers=1)}), "extra_shapes"),
] + ([] if torch.cuda.is_available() else
      [("device", dict(device="cuda"), r"device 'cuda' does not exist here; choose from \['cpu'\]")])


@pytest.fixture
def no_child(monkeypatch):
    """Fails the test if anything tries to start a process."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("name, kwargs, message", BAD_ARGUMENTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_are_refused_before_any_work(tmp_path, no_child, name, kwargs, message):
    out_dir = tmp_path / "out"
    args = dict(device="cpu", shapes=["gelu-4l"], sizes=[8], repeats=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as info:
        bench.run(str(out_dir), **args)
    assert name in str(info.value)
    with pytest.raises(ValueError, match=message):  # the same check, on its own (what a CLI calls)
        bench.validate_arguments(str(out_dir), **args)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the output directory


def test_bad_out_dir_is_refused_before_any_work(tmp_path, no_child):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a directory")
    with pytest.raises(ValueError, match="out_dir: .* exists and is not a directory"):
        bench.run(str(a_file), device="cpu", shapes=["gelu-4l"], sizes=[8])
    with pytest.raises(ValueError, match="out_dir: .* cannot be created, .* is a file"):
        bench.run(str(a_file / "sub"), device="cpu", shapes=["gelu-4l"], sizes=[8])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]
    settings = bench.validate_arguments(str(tmp_path / "new" / "dir"), device="cpu", shapes=["gelu-4l"])
    assert settings["out_dir"] == str(tmp_path / "new" / "dir") and settings["sizes"] == bench.CPU_SIZES
    assert not (tmp_path / "new").exists()  # validation creates nothing


# ---------------------------------------------------------------------------------------------------
# interleaved rounds, the roofline reference, the recorded conditions

def test_rounds_interleave_rotate_and_probe_before_each_round():

    log = []

    def call(name):
        return lambda: log.append(name)

    def probe():
        log.append("probe")
        return 100.0

    res = rounds.run_rounds({n: call(n) for n in "ABC"}, torch.device("cpu"), probe,
                            rounds.RoundSettings(min_rounds=3, max_rounds=3, target_spread=-1.0, budget_s=60))
    assert log == ["probe", "A", "B", "C", "probe", "B", "C", "A", "probe", "C", "A", "B"]
    assert res.rounds == 3 and res.stop == "max rounds" and res.probes == [100.0] * 3
    assert all(len(t) == 3 for t in res.times.values())


def test_speedup_is_the_median_of_per_round_ratios_so_drift_cancels():
    """The machine slows down 3x for two rounds: both providers' times move, their ratio does not."""

    slow = [1, 1, 3, 3, 1]
    tl = [2.0 * f for f in slow]
    ours = [0.5 * f for f in slow]
    assert rounds.per_round_ratios(tl, ours) == [4.0] * 5
    assert rounds.quartiles(rounds.per_round_ratios(tl, ours)) == (4.0, 4.0, 4.0)
    # timed one after another, the same drift would land on one provider only:
    assert statistics.median(tl[:3]) / statistics.median(ours[3:]) != 4.0


def test_rounds_stop_when_converged_or_out_of_budget():

    steady = rounds.run_rounds({"TL": lambda: None, "x": lambda: None}, torch.device("cpu"), lambda: 1.0,
                               rounds.RoundSettings(min_rounds=4, max_rounds=50, target_spread=10.0, budget_s=60), "TL")
    assert steady.stop == "converged" and steady.rounds == 4
    import time as _time

    slow = rounds.run_rounds({"x": lambda: _time.sleep(0.05)}, torch.device("cpu"), lambda: 1.0,
                             rounds.RoundSettings(min_rounds=1000, max_rounds=2000, target_spread=0.0, budget_s=0.3))
    assert slow.stop == "budget" and 2 <= slow.rounds < 20


def test_roofline_reference_is_the_best_probe_and_above_100_percent_is_flagged():
    p = harness.Point("K1", "gelu-4l", "fast", 8192, median_s=1.0, rounds=5)
    work = workloads.flops("K1", "gelu-4l", 8192)
    roof = {"matmul_gflops": {"float32": work / 1e9 / 2}}  # start-of-run measurement: half of what K1 needs
    rates = harness.finish([p], roof, probes=[dict(gflops=[work / 1e9 * 0.5, work / 1e9 * 4])])
    assert rates["float32"] == work / 1e9 * 4 and p.roofline_pct == 25.0 and p.roofline_flag == ""
    q = harness.Point("K1", "gelu-4l", "fast", 8192, median_s=1.0, rounds=5)
    harness.finish([q], roof)  # no probes: the low reference makes K1 look like 200 %
    assert q.roofline_pct is None and "measurement problem" in q.roofline_flag
    from erasure_fast.bench import report

    md = report.markdown(dict(label="x", date="d", machine=dict(cpu="c", cores=2, torch="t", torch_threads=2),
                              roofline=dict(roof, copy_gbps=1.0), repeats=5, command="c", probes=[]),
                         harness.as_records([q]))
    assert ">100 %: measurement problem" in md and "200" not in md.split("| fast |")[1]


def test_kernel_rows_in_bfloat16_use_the_bfloat16_matmul_rate():
    """--dtype bfloat16: inputs and model in bf16, every point labelled with it, the probes counted for
    bf16, and the roofline taken against the bf16 matmul rate."""
    points, probes = [], []
    harness.run_kernels(["gelu-4l"], [8], torch.device("cpu"), repeats=1, budget_s=30, providers=["erasure_fast cpp"],
                        progress=lambda line: None, points=points, probes=probes, dtype=torch.bfloat16,
                        round_settings=rounds.RoundSettings(min_rounds=1, max_rounds=1, budget_s=30))
    assert points and {p.dtype for p in points} == {"bfloat16"} and all(p.status == "ok" for p in points)
    assert {p["dtype"] for p in probes} == {"bfloat16"}
    roof = {"matmul_gflops": {"float32": 1.0, "bfloat16": 1e-9}}
    rates = harness.finish(points, roof, probes)
    assert rates["bfloat16"] == max(max(p["gflops"]) for p in probes) and rates["float32"] == 1.0
    k1 = next(p for p in points if p.workload == "K1")
    assert k1.roofline_pct == pytest.approx(100 * workloads.flops("K1", "gelu-4l", 8) / k1.median_s / 1e9 / rates["bfloat16"])


def test_s1_and_c1_rows_all_run_on_one_row_of_tokens():
    """Every S1 / C1 row (TransformerLens pipeline, bare forwards, scans, the interleaved overhead) runs
    and times something, on one 1,024-token row of the GELU-4L shape."""
    from erasure_fast.bench import harness

    lines = []
    points = harness.run_s1(1024, torch.device("cpu"), progress=lines.append, overhead_rounds=1)
    names = [(p.workload, p.provider) for p in points]
    assert names == [("C1", "transformer_lens hooks"), ("C1", "erasure_fast engine"), ("S1", "transformer_lens pipeline"),
                     ("S1", "bare forward, TL hooks (no unembed)"), ("S1", "engine forward (no unembed)"),
                     ("S1", "erasure_fast scan (engine)"), ("S1", "erasure_fast scan (hooks)"),
                     ("S1", "scan (engine) / engine forward, interleaved")]
    for p in points:
        assert p.status == "ok" and p.median_s > 0 and p.n_tokens == 1024, (p.provider, p.status, p.note)
    assert "median" in points[-1].note and len(lines) == len(points)


def test_c1_rows_of_hugging_face_families_time_hooks_and_engine():
    """C1 for each Hugging Face family: bridge hooks and the hf_modules engine both run and time
    something on one 1,024-token row, with the family's own FLOP count and the speedup over hooks."""
    from erasure_fast.bench import harness
    from erasure_fast.bench.hf_capture import HF_FAMILIES, forward_flops

    lines = []
    points = harness.run_c1_hf(1024, torch.device("cpu"), list(HF_FAMILIES), progress=lines.append)
    assert [(p.shape, p.provider) for p in points] == [
        (f"{f}-512", name) for f in HF_FAMILIES for name in ("transformer_lens hooks", "erasure_fast engine")]
    for p in points:
        assert p.workload == "C1" and p.status == "ok" and p.median_s > 0 and p.n_tokens == 1024, (p.shape, p.note)
    assert points[0].flops == forward_flops("llama", 1024) > forward_flops("gpt_neox", 1024)  # gated MLP: 3 matrices
    harness.finish(points, dict(matmul_gflops={"float32": 1e6}))
    assert all(p.speedup_vs_tl is not None and p.roofline_pct is not None for p in points)
    assert len(lines) == len(points)


def test_the_child_finds_top_level_distributions_not_our_subpackages(tmp_path, monkeypatch):
    """The measuring child imports this very erasure_fast, and a top-level module whose name is also one
    of the package's subpackages (``kernels``: transformers imports that distribution) is never the
    subpackage: the folder that holds the package goes on the child's path, not the package's folder.
    (Stand-ins on PYTHONPATH make each name importable; where the real distribution is installed, it
    may come first.)"""
    import sys

    import erasure_fast

    ours = os.path.dirname(erasure_fast.__file__)
    # the subpackages: folders with an __init__.py, and erasure_fast.kernels (a module with a search path)
    names = sorted({n for n in os.listdir(ours) if os.path.isfile(os.path.join(ours, n, "__init__.py"))} | {"kernels"})
    assert "models" in names and hasattr(erasure_fast.kernels, "__path__")
    third_party = tmp_path / "site"
    for name in names:
        (third_party / name).mkdir(parents=True)
        (third_party / name / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(third_party))
    probe = f"import erasure_fast, importlib; print(erasure_fast.__file__); [print(importlib.import_module(n).__file__) for n in {names!r}]"
    out = subprocess.run([sys.executable, "-c", probe], env=bench.child_environment(), cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == erasure_fast.__file__
    assert len(out) == len(names) + 1 and not [path for path in out[1:] if path.startswith(ours + os.sep)], out


def _tl_import(outcome):
    """A stand-in for `import_optional` where TransformerLens is absent (None) or broken (raises)."""
    from erasure_fast.optional_deps import OptionalDependencyError

    def fake(name):
        if not name.startswith("transformer_lens"):
            raise AssertionError(f"unexpected optional import {name}")
        if outcome == "broken":
            raise OptionalDependencyError(f"{name} is installed but cannot be imported: ImportError: cannot "
                                          "import name 'CUDAProperties' from 'kernels'")
        return None

    return fake


def test_a_broken_transformer_lens_refuses_the_workloads_before_timing(monkeypatch):
    """TransformerLens installed but failing to import: every workload that needs it as its reference
    is one "error" point with the cause, and nothing is timed (no provider runs)."""
    monkeypatch.setitem(workloads.SHAPES, "tiny", TINY)
    monkeypatch.setattr(harness, "import_optional", _tl_import("broken"))
    monkeypatch.setattr(harness, "measure", lambda *a, **k: pytest.fail("a provider was timed"))
    lines: list = []
    points = harness.run_kernels(["tiny"], [24, 48], torch.device("cpu"), repeats=2, budget_s=60, progress=lines.append)
    points += harness.run_s1(1024, torch.device("cpu"), progress=lines.append)
    assert [(p.workload, p.n_tokens) for p in points] == [
        (w, n) for n in (24, 48) for w in ("K1", "K2n", "K2f")] + [("S1", 1024)]
    for p in points:
        assert p.status == "error" and p.median_s is None and p.provider == "transformer_lens", p
        assert p.note.startswith("not timed: transformer_lens") and "cannot import name 'CUDAProperties'" in p.note
    assert len(lines) == len(points) and all("CUDAProperties" in line for line in lines)


@needs_cpp
def test_without_transformer_lens_the_own_providers_are_timed_and_s1_refused(monkeypatch):
    """TransformerLens 4 not installed (a GPU machine without it): the kernels are timed on a ModelSpec
    of random weights, TransformerLens's rows say why they are missing, S1 is refused with the reason."""
    monkeypatch.setitem(workloads.SHAPES, "tiny", TINY)
    monkeypatch.setattr(harness, "import_optional", _tl_import("absent"))
    points = harness.run_kernels(["tiny"], [24], torch.device("cpu"), repeats=2, budget_s=60, progress=lambda line: None,
                                 providers=["transformer_lens", "erasure_fast cpp"],
                                 round_settings=rounds.RoundSettings(min_rounds=2, budget_s=1))
    s1 = harness.run_s1(1024, torch.device("cpu"), progress=lambda line: None)
    for p in points:
        if p.provider.startswith("transformer_lens"):
            assert p.status == "skipped" and p.note == "TransformerLens 4 not installed", p
        else:
            assert p.status == "ok" and p.median_s > 0, p
    assert {p.provider for p in points if p.status == "ok"} >= {"erasure_fast cpp"}
    assert [(p.workload, p.status) for p in s1] == [("S1", "error")] and "not installed" in s1[0].note
