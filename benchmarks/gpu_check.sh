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
#      tests and every `gpu`-marked test, then - when benchmarks/make_synthetic.py and `lite bench`
#      exist - writes a 27-layer DeepSeek-Coder-V2-Lite-dims Q4_0 synthetic GGUF and runs
#      `lite bench --backend cuda --json` with all weights on the GPU, and again with a VRAM budget
#      of the resident tensors plus 25% of the expert bytes. Everything lands in $OUT (or
#      ./gpu-out): build.log, pytest.log, junit.xml, bench_full.json, bench_budget25.json,
#      summary.txt. Each step has its own time limit; the whole stays under ~9 minutes.
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
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
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
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | tee "$OUT/nvidia-smi.txt" | sed 's/^/gpu: /' | tee -a "$SUMMARY"

# ---- build (CMake directly: no pip, no network) ------------------------------------------------------
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
ARCH="${ARCH:-90}"
BUILD="$ROOT/build/gpu-check"
if timeout 240 bash -c "cmake -S '$ROOT' -B '$BUILD' -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=$ARCH \
      && cmake --build '$BUILD' -j \$(nproc)" > "$OUT/build.log" 2>&1; then
  # Use the fresh build in place (headers come from csrc/): nothing is written into lite/.
  export LITE_LIB="$BUILD/liblite_cpu.so" LITE_CUDA_LIB="$BUILD/csrc/cuda/liblite_cuda.so"
  note "build: ok for sm_$ARCH ($(elapsed)s)"
else
  note "build: FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1
fi
"$PY" -c "from lite.kernels import available_backends as a, _unavailable as u; print('backends:', a(), u)" 2>&1 | tee -a "$SUMMARY"

# ---- tests ---------------------------------------------------------------------------------------------
timeout 300 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit.xml" -rs \
  tests/test_kernels_cuda.py > "$OUT/pytest.log" 2>&1
note "pytest tests/test_kernels_cuda.py: rc=$? $(tail -1 "$OUT/pytest.log") ($(elapsed)s)"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20 | tee -a "$SUMMARY"
if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then   # optional: out-of-bounds hunt
  timeout 240 compute-sanitizer --tool memcheck "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
    -k "matmul or moe or mla or route" > "$OUT/sanitizer.log" 2>&1
  note "compute-sanitizer memcheck: rc=$? $(grep -c 'Invalid' "$OUT/sanitizer.log") invalid accesses ($(elapsed)s)"
fi
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/ \
  --ignore=tests/test_kernels_cuda.py > "$OUT/pytest_gpu_all.log" 2>&1
note "pytest -m gpu (rest of tests/): rc=$? $(tail -1 "$OUT/pytest_gpu_all.log") ($(elapsed)s)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_model_fixtures.py tests/test_pager.py \
  -k "cuda" > "$OUT/pytest_models.log" 2>&1
note "pytest model fixtures / pager on cuda: rc=$? $(tail -1 "$OUT/pytest_models.log") ($(elapsed)s)"

# ---- synthetic Lite model and lite bench -----------------------------------------------------------------
if ! "$PY" -c "import lite.kernels.cuda" >/dev/null 2>&1; then note "bench: skipped (no usable CUDA backend)"; exit 0; fi
if [ ! -f benchmarks/make_synthetic.py ]; then note "bench: skipped (no benchmarks/make_synthetic.py)"; exit 0; fi
BENCH=""
if "$PY" -m lite.cli bench --help >/dev/null 2>&1; then BENCH="$PY -m lite.cli bench"
elif "$PY" -m lite.bench --help >/dev/null 2>&1; then BENCH="$PY -m lite.bench"
else note "bench: skipped (no 'lite bench')"; exit 0; fi
MODEL=/tmp/lite-synth-q4_0.gguf
if ! timeout 200 "$PY" benchmarks/make_synthetic.py --layers 27 --preset q4_0 --out "$MODEL" --no-validate \
    > "$OUT/make_synthetic.log" 2>&1; then
  note "make_synthetic: FAILED or timed out ($(elapsed)s)"; tail -5 "$OUT/make_synthetic.log"; exit 1
fi
note "synthetic model: $(du -h "$MODEL" | cut -f1) ($(elapsed)s)"
BARGS="--backend cuda --json --prompt 128 --gen 32 --repeats 2 --no-bandwidth"
timeout 150 $BENCH "$MODEL" $BARGS > "$OUT/bench_full.json" 2> "$OUT/bench_full.log"
note "bench all-on-GPU: rc=$? $(head -c 400 "$OUT/bench_full.json") ($(elapsed)s)"

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
timeout 150 $BENCH "$MODEL" $BARGS $VARGS > "$OUT/bench_budget25.json" 2> "$OUT/bench_budget25.log"
note "bench VRAM budget $BUDGET bytes (resident + 25% of experts): rc=$? $(head -c 400 "$OUT/bench_budget25.json") ($(elapsed)s)"
unset LITE_VRAM_BUDGET
rm -f "$MODEL"
note "done in $(elapsed)s"
