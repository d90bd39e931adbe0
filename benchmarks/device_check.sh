#!/usr/bin/env bash
# The prepared GPU check (one call of the device tool, under 8 minutes):
#   1. build + install the package on the GPU machine (C++ extension included),
#   2. GPU correctness tests at real sizes (tests/test_gpu.py) and the Triton interpreter-free tests,
#   3. the benchmark harness with GPU sizes (K1, K2 at 8192 and 1M tokens; Triton, torch on GPU, and
#      TransformerLens's method when it is installed), matmul rate per dtype and copy bandwidth,
#   4. a short table printed last.
# Results go to $EF_DEVICE_OUT (default: $OUT if set -- the device tool's output folder -- else
# benchmarks/results/gpu). Usage from the device tool:  bash benchmarks/device_check.sh
set -uo pipefail
OUT_DIR="${EF_DEVICE_OUT:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
# The CLI runs from a folder outside the checkout: from its root, `python -m erasure_fast.cli` would
# import the source tree (no compiled extension, no erasure_fast.kernels) instead of the installed package.
RUN_DIR="$(mktemp -d)"
ef() { (cd "$RUN_DIR" && "$PY" -m erasure_fast.cli "$@"); }
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # still valid after a cd
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
log() { echo "[device_check +$(( $(date +%s) - start ))s] $*"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
# Optional wheels carried into .wheels/ (e.g. scikit-build-core, pybind11); no internet on the machine.
if [ -d .wheels ]; then "$PY" -m pip install -q --no-index --find-links .wheels .wheels/*.whl || log "carried wheels: install failed"; fi
"$PY" -m pip install -q --no-build-isolation --no-deps . || { log "package install failed"; exit 1; }
log "installed; backends:"; ef backends

log "GPU correctness tests"
(cd tests && timeout 150 "$PY" -m pytest -q -p no:cacheprovider test_gpu.py 2>&1 | tail -15) | tee "$OUT_DIR/gpu_tests.txt"

log "benchmark (K1, K2 at 8192 and 1M tokens)"
timeout 300 bash -c "cd '$RUN_DIR' && '$PY' -m erasure_fast.cli bench --device cuda --shapes gelu-4l \
    --sizes 8192,1048576 --repeats 5 --budget-s 20 --round-budget-s 12 --out '$OUT_DIR'" > "$OUT_DIR/bench_log.txt" 2>&1
rc=$?
tail -5 "$OUT_DIR/bench_log.txt"
log "summary (bench exit code $rc)"
"$PY" - "$OUT_DIR" <<'PYEOF'
import glob, json, sys
files = sorted(glob.glob(sys.argv[1] + "/*.json"))
if not files:
    print("no benchmark JSON written"); sys.exit(0)
data = json.load(open(files[-1]))
print("roofline:", data["meta"]["roofline"], "best:", data["meta"].get("matmul_best_gflops"))
print("disturbed:", data["meta"].get("disturbed"))
print(f"{'workload':8s} {'tokens':>8s} {'provider':32s} {'status':7s} {'median s':>10s} {'x TL':>7s} {'roof %':>7s}")
for r in data["results"]:
    f = lambda v, s: (s % v) if v is not None else ""
    roof = "flag" if r.get("roofline_flag") else f(r["roofline_pct"], "%.1f")
    print(f"{r['workload']:8s} {r['n_tokens']:>8d} {r['provider']:32s} {r['status']:7s} {f(r['median_s'], '%.5f'):>10s} "
          f"{f(r['speedup_vs_tl'], '%.1f'):>7s} {roof:>7s}")
PYEOF
exit $rc
