#!/usr/bin/env bash
# The prepared GPU check (one call of the device tool, under 8 minutes):
#   1. build + install the package on the GPU machine (C++ extension included),
#   2. GPU correctness tests at real sizes (tests/test_gpu.py: Triton and torch kernels, scan aggregates),
#   3. S1 (the scan workload) at 1M tokens in bfloat16: TransformerLens pipeline, bare forward through
#      TL hooks and through the capture engine, the scan on each -- when transformer_lens imports there
#      (it is not in the machine's image: `make device-wheels` here, then carry .wheels),
#   4. the benchmark harness with GPU sizes (K1, K2 at 8192 and 1M tokens; Triton, torch on GPU, and
#      TransformerLens's method when it is installed), matmul rate per dtype and copy bandwidth,
#   5. a short table printed last.
# Every step gets at most what is left of EF_DEVICE_BUDGET_S (default 450 s) and its own cap, so the
# script ends inside the device tool's plan even when a step (a Triton first compile) runs long.
# Results go to $EF_DEVICE_OUT (default benchmarks/results/gpu). Under the device tool ($OUT set, which
# brings back at most 8 files) they are written to a temporary folder and packed into
# $OUT/device_check.tgz at the end. Usage from the device tool:  bash benchmarks/device_check.sh
set -uo pipefail
if [ -n "${EF_DEVICE_OUT:-}" ]; then OUT_DIR="$EF_DEVICE_OUT"
elif [ -n "${OUT:-}" ]; then OUT_DIR="$(mktemp -d)/device_check"; PACK="$OUT/device_check.tgz"
else OUT_DIR=benchmarks/results/gpu; fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
pack() { if [ -n "${PACK:-}" ]; then tar czf "$PACK" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")"; fi; }
trap pack EXIT
BUDGET_S="${EF_DEVICE_BUDGET_S:-450}"
# The CLI runs from a folder outside the checkout: from its root, `python -m erasure_fast.cli` would
# import the source tree (no compiled extension) instead of the installed package.
RUN_DIR="$(mktemp -d)"
ef() { (cd "$RUN_DIR" && "$PY" -m erasure_fast.cli "$@"); }
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # still valid after a cd
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
log() { echo "[device_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT_DIR/device_log.txt"; }
# seconds for the next step: its cap, or what is left of the budget if that is less (at least 1)
left() { local l=$(( BUDGET_S - ($(date +%s) - start) )); [ "$l" -lt "$1" ] || l=$1; [ "$l" -ge 1 ] || l=1; echo "$l"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
# Wheels carried into .wheels/ (`make device-wheels`: transformer_lens and what it imports that the
# machine's image lacks); no internet on the machine, so no dependency resolution either.
if [ -d .wheels ]; then "$PY" -m pip install -q --no-index --no-deps .wheels/*.whl || log "carried wheels: install failed"; fi
"$PY" -m pip install -q --no-build-isolation --no-deps . || { log "package install failed"; exit 1; }
log "installed; backends:"; ef backends | tee -a "$OUT_DIR/device_log.txt"

log "GPU correctness tests"
(cd tests && PYTHONUNBUFFERED=1 timeout "$(left 170)" "$PY" -m pytest -v -p no:cacheprovider --durations=0 test_gpu.py \
    > "$OUT_DIR/gpu_tests.txt" 2>&1) || log "GPU tests exit code $? (124: cut by the time budget)"
tail -15 "$OUT_DIR/gpu_tests.txt"

if tl_error=$("$PY" -c "import transformer_lens.model_bridge" 2>&1 >/dev/null); then
  log "S1 at 1M tokens, bfloat16 (TL pipeline, TL hooks, engine, scan)"
  mkdir -p "$OUT_DIR/s1"
  timeout "$(left 240)" bash -c "cd '$RUN_DIR' && '$PY' -m erasure_fast.cli bench --device cuda --shapes gelu-4l \
      --sizes 8192 --providers triton --repeats 1 --budget-s 10 --s1-tokens 1048576 --s1-dtype bfloat16 \
      --c1-families llama,gpt_neox,gemma2 \
      --out '$OUT_DIR/s1'" > "$OUT_DIR/s1_log.txt" 2>&1 || log "S1 exit code $?"
  grep -E "^(S1|C1) " "$OUT_DIR/s1_log.txt"
else
  log "S1 skipped: transformer_lens does not import here ($(printf '%s' "$tl_error" | tail -n 1)); on the CPU machine: make device-wheels, then carry .wheels"
fi
log "benchmark (K1, K2 at 8192 and 1M tokens)"
timeout "$(left 300)" bash -c "cd '$RUN_DIR' && '$PY' -m erasure_fast.cli bench --device cuda --shapes gelu-4l \
    --sizes 8192,1048576 --repeats 5 --budget-s 20 --round-budget-s 12 --out '$OUT_DIR'" > "$OUT_DIR/bench_log.txt" 2>&1
rc=$?
tail -5 "$OUT_DIR/bench_log.txt"

log "summary (bench exit code $rc)"
"$PY" - "$OUT_DIR" <<'PYEOF' | tee "$OUT_DIR/summary.txt"
import glob, json, sys
runs = [sorted(glob.glob(sys.argv[1] + sub + "/*.json"))[-1:] for sub in ("", "/s1")]  # latest of each run
files = [f for run in runs for f in run]
if not files:
    print("no benchmark JSON written"); sys.exit(0)
data = json.load(open(files[0]))
print("roofline:", data["meta"]["roofline"], "best:", data["meta"].get("matmul_best_gflops"))
print("disturbed:", data["meta"].get("disturbed"))
print(f"{'workload':8s} {'tokens':>8s} {'provider':32s} {'status':7s} {'median s':>10s} {'x TL':>7s} {'roof %':>7s}")
rows = [r for f in files for r in json.load(open(f))["results"]]
for r in rows:
    f = lambda v, s: (s % v) if v is not None else ""
    roof = "flag" if r.get("roofline_flag") else f(r["roofline_pct"], "%.1f")
    print(f"{r['workload']:8s} {r['n_tokens']:>8d} {r['provider']:32s} {r['status']:7s} {f(r['median_s'], '%.5f'):>10s} "
          f"{f(r['speedup_vs_tl'], '%.1f'):>7s} {roof:>7s}")
PYEOF
exit $rc
