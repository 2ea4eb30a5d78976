#!/usr/bin/env bash
# One GPU session's checks for the CUDA backend, in two steps.
#
#   1. Here (a machine with network and the dev venv), once:
#        benchmarks/gpu_check.sh prepare
#      copies ../shared/fixtures and ../shared/vocab into .gpu/ and downloads the wheels the GPU
#      image lacks (gguf, cffi, pycparser; Python 3.12) into .gpu/whl; .gpu/ is listed in
#      .git/info/exclude, so it travels only when carried.
#   2. On the GPU machine (device tool: carry [".gpu"], timeout_s 600):
#        bash benchmarks/gpu_check.sh
#      builds liblite_cpu + liblite_cuda for the local GPU's architecture with CMake, runs the CUDA
#      tests and every other test on the cuda backend, times the kernels (benchmarks/gpu_kernels.py),
#      then writes a 27-layer DeepSeek-Coder-V2-Lite-dims Q4_0 synthetic GGUF and runs
#      `lite bench --backend cuda` with all weights on the GPU, with a VRAM budget of the resident
#      tensors plus 25% of the expert bytes (misses copied; then misses on the CPU where faster),
#      and the host/GPU split of a decode token (benchmarks/profile_decode.py). summary.txt and
#      the bench JSONs land in $OUT (or ./gpu-out), every log in $OUT/logs.tgz. SKIP_BENCH=1 stops
#      after the tests.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "${1:-}" = "prepare" ]; then
  set -e
  PY="${PY:-$ROOT/.venv/bin/python}"
  mkdir -p .gpu/whl
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu/fixtures .gpu/vocab
  cp -r ../shared/fixtures .gpu/fixtures
  [ -d ../shared/vocab ] && cp -r ../shared/vocab .gpu/vocab
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl gguf==0.19.0 cffi==2.1.1 pycparser
  du -sh .gpu
  echo "prepared: now run 'bash benchmarks/gpu_check.sh' on the GPU machine, carrying .gpu"
  exit 0
fi

OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
# The device tool returns at most 8 files: logs go to $LOGS and are re-packed into one archive
# after every step (so a step killed by its time limit still leaves the earlier logs).
LOGS="$(mktemp -d)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1

# ---- Python and packages -------------------------------------------------------------------------
PY=python3
if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import numpy" 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
fi
if ! "$PY" -c "import cffi, gguf" 2>/dev/null && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/fixtures ] && export LITE_FIXTURES="$ROOT/.gpu/fixtures"
[ -d .gpu/vocab ] && export LITE_VOCAB="$ROOT/.gpu/vocab"
note "python: $("$PY" --version 2>&1) ($PY)"
"$PY" -c "import numpy, cffi, gguf" 2>>"$SUMMARY" || note "WARNING: numpy/cffi/gguf missing: run 'benchmarks/gpu_check.sh prepare' first and carry .gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | tee "$LOGS/nvidia-smi.txt" | sed 's/^/gpu: /' | tee -a "$SUMMARY"

# ---- build (CMake directly: no pip, no network) ------------------------------------------------------
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
ARCH="${ARCH:-90}"
BUILD="$ROOT/build/gpu-check"
if timeout 240 bash -c "cmake -S '$ROOT' -B '$BUILD' -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=$ARCH \
      && cmake --build '$BUILD' -j \$(nproc)" > "$LOGS/build.log" 2>&1; then
  # Use the fresh build in place (headers come from csrc/): nothing is written into lite/.
  export LITE_LIB="$BUILD/liblite_cpu.so" LITE_CUDA_LIB="$BUILD/csrc/cuda/liblite_cuda.so"
  note "build: ok for sm_$ARCH ($(elapsed)s)"
else
  note "build: FAILED (see build.log)"; tail -30 "$LOGS/build.log"; exit 1
fi
"$PY" -c "from lite.kernels import available_backends as a, _unavailable as u; print('backends:', a(), u)" 2>&1 | tee -a "$SUMMARY"

# ---- tests ---------------------------------------------------------------------------------------------
timeout 300 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$LOGS/junit.xml" -rs \
  tests/test_kernels_cuda.py > "$LOGS/pytest.log" 2>&1
note "pytest tests/test_kernels_cuda.py: rc=$? $(tail -1 "$LOGS/pytest.log") ($(elapsed)s)"
grep -E "^(FAILED|ERROR)" "$LOGS/pytest.log" | head -20 | tee -a "$SUMMARY"
if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then   # optional: out-of-bounds hunt
  timeout 240 compute-sanitizer --tool memcheck "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
    -k "matmul or moe or mla or route" > "$LOGS/sanitizer.log" 2>&1
  note "compute-sanitizer memcheck: rc=$? $(grep -c 'Invalid' "$LOGS/sanitizer.log") invalid accesses ($(elapsed)s)"
fi
# Every other test that runs on the cuda backend: the backend-parametrised files (ids carry the
# backend's name), the fixture models end to end among them. Named files only: collecting all of
# tests/ would need textual, which the GPU image lacks.
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_model_fixtures.py tests/test_fused_ops.py \
  tests/test_mla.py tests/test_pager.py tests/test_overhead_moe.py tests/test_bad_input.py tests/test_bench.py \
  > "$LOGS/pytest_cuda_models.log" 2>&1
note "pytest -k cuda (fixture models, fused ops, mla, pager, moe, bad input, bench): rc=$? $(tail -1 "$LOGS/pytest_cuda_models.log") ($(elapsed)s)"
grep -E "^(FAILED|ERROR)" "$LOGS/pytest_cuda_models.log" | head -20 | tee -a "$SUMMARY"

# ---- synthetic Lite model and lite bench (SKIP_BENCH=1: tests only) ----------------------------------------
if ! "$PY" -c "import lite.kernels.cuda" >/dev/null 2>&1; then note "bench: skipped (no usable CUDA backend)"; exit 0; fi
if [ "${SKIP_BENCH:-0}" = 1 ]; then note "bench: skipped (SKIP_BENCH=1)"; exit 0; fi
timeout 90 "$PY" benchmarks/gpu_kernels.py > "$LOGS/gpu_kernels.txt" 2>&1
note "kernel timings (benchmarks/gpu_kernels.py): rc=$? ($(elapsed)s)"
tee -a "$SUMMARY" < "$LOGS/gpu_kernels.txt"
if [ ! -f benchmarks/make_synthetic.py ]; then note "bench: skipped (no benchmarks/make_synthetic.py)"; exit 0; fi
BENCH=""
if "$PY" -m lite.cli bench --help >/dev/null 2>&1; then BENCH="$PY -m lite.cli bench"
elif "$PY" -m lite.bench --help >/dev/null 2>&1; then BENCH="$PY -m lite.bench"
else note "bench: skipped (no 'lite bench')"; exit 0; fi
MODEL=/tmp/lite-synth-q4_0.gguf
if ! timeout 200 "$PY" benchmarks/make_synthetic.py --layers 27 --preset q4_0 --out "$MODEL" --no-validate \
    > "$LOGS/make_synthetic.log" 2>&1; then
  note "make_synthetic: FAILED or timed out ($(elapsed)s)"; tail -5 "$LOGS/make_synthetic.log"; exit 1
fi
note "synthetic model: $(du -h "$MODEL" | cut -f1) ($(elapsed)s)"
BARGS="--backend cuda --json --prompt 128 --gen 32 --repeats 3 --no-bandwidth"
table() { "$PY" -c "import json, sys; from lite.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" \
  "$1" 2>&1 | tee -a "$SUMMARY"; cp "$1" "$OUT/"; }
timeout 150 $BENCH "$MODEL" $BARGS --depth 4096 > "$LOGS/bench_full.json" 2> "$LOGS/bench_full.log"
note "bench all-on-GPU: rc=$? ($(elapsed)s)"
table "$LOGS/bench_full.json"

BUDGET=$("$PY" - "$MODEL" <<'EOF'
import sys
from lite.weights.gguf_file import open_model_file
from lite.model.tensors import is_expert_tensor
mf = open_model_file(sys.argv[1])
exp = sum(t.nbytes for n, t in mf.tensors.items() if is_expert_tensor(n))
res = sum(t.nbytes for n, t in mf.tensors.items() if not is_expert_tensor(n))
print(res + exp // 4)
EOF
)
if $BENCH --help 2>/dev/null | grep -q -- "--vram-budget"; then
  VARGS="--vram-budget $BUDGET"
else
  VARGS=""; export LITE_VRAM_BUDGET="$BUDGET"      # read by CudaBackend when the flag is absent
fi
timeout 150 $BENCH "$MODEL" $BARGS $VARGS > "$LOGS/bench_budget25.json" 2> "$LOGS/bench_budget25.log"
note "bench VRAM budget $BUDGET bytes (resident + 25% of experts): rc=$? ($(elapsed)s)"
table "$LOGS/bench_budget25.json"
# The same budget with misses computed on the CPU where that measures faster than copying.
LITE_CUDA_MISS=auto timeout 120 $BENCH "$MODEL" $BARGS $VARGS > "$LOGS/bench_budget25_auto.json" \
  2> "$LOGS/bench_budget25_auto.log"
note "bench VRAM budget as above, miss policy auto: rc=$? ($(elapsed)s)"
table "$LOGS/bench_budget25_auto.json"
unset LITE_VRAM_BUDGET
# Where a decode token's time goes on the GPU path: host work per launch, and the wait for the GPU.
timeout 90 "$PY" benchmarks/profile_decode.py "$MODEL" --backend cuda --tokens 32 --repeats 3 \
  > "$LOGS/profile_cuda.txt" 2>&1
note "profile_decode --backend cuda: rc=$? ($(elapsed)s)"
head -30 "$LOGS/profile_cuda.txt" | tee -a "$SUMMARY"

rm -f "$MODEL"
note "done in $(elapsed)s"
