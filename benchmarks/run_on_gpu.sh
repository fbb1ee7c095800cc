#!/usr/bin/env bash
# One batched GPU session: correctness of every Triton kernel on the real device, then the benchmark suites, each
# under its own time limit, writing JSON + PNG to ${OUT:-bench_out}. Prepare on a machine with network first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl jax-triton==0.3.1      # .whl/ is git-ignored; carry it
# The shared GPU image has jax (CUDA), triton 3.6 and torch but no jax-triton (see shared/PITFALLS.md).
# tokamax (the layer suite's second JAX composition, LAYER_PEERS=lax.ragged_dot,tokamax) is not there either; with
# jax 0.11.2 these wheels beside the image's own packages import it (seen on CPU, 2026-11-27; xprof is stubbed by
# benchmarks.peers): the same download for tokamax==0.0.17 einshape pydantic==2.14.4 pydantic-core==2.50.5
# annotated-types typing-inspection typing-extensions>=4.16 qwix immutabledict tensorboardx (about 6 MB).
set -uo pipefail
cd "$(dirname "$0")/.."
export HOME=/tmp TRITON_CACHE_DIR=/tmp/triton PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# XLA's persistent compilation cache: the suites run as separate processes over the same programs (a skew run
# repeats the balanced run's shapes), so later processes skip most compiles (Triton's own cache is TRITON_CACHE_DIR).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache} JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
out=${OUT:-bench_out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
  python3 - <<'PY'
import platform, jax, jaxlib, numpy, triton
try:
    import torch; tv = torch.__version__
except ImportError:
    tv = "absent"
print("device:", jax.devices()[0], "| python", platform.python_version(), "| jax", jax.__version__, "| jaxlib",
      jaxlib.__version__, "| triton", triton.__version__, "| torch", tv, "| numpy", numpy.__version__)
PY
} 2>&1 | tee "$out/env.txt"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
# QUICK=1 fits a 15-minute device lease (benchmarks/RESULTS.md): the quick tests (not the TMA ones), three GMM
# shapes and the Qwen3 layer, balanced routing only. Without it: every test and every shape (longer than 15 minutes).
# TESTS=0 / GMM=0 / LAYER=0 / PIECES=0 skip those steps (e.g. a second call for SKEW_SHAPES or PROFILE alone).
quick=${QUICK:-0}
marks=$([ "$quick" = 1 ] && echo "not slow" || echo "slow or not slow")
# 1. The kernels on the device against the reference (parity + gradients; pytest-xdist is in the GPU image).
[ "${TESTS:-1}" = 1 ] && timeout "${TEST_TIMEOUT:-$([ "$quick" = 1 ] && echo 170 || echo 300)}" \
  python3 -m pytest -q -p no:cacheprovider -n 8 --maxfail=8 -m "$marks" tests/test_triton_gmm.py tests/test_sort.py \
  tests/test_fused.py tests/test_swiglu_ffn.py -k "not pallas and not xla and not shard_map" \
  2>&1 | tee "$out/gpu_tests.log" | tail -5
# 1b. The persistent TMA GMM variant (global scratch through triton_call) on its own tests; the default flips only
#     once the gmm suite shows it faster.
[ "$quick" = 1 ] || MOE_OPS_GMM_VARIANT=tma timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 -m "$marks" \
  tests/test_gmm_tma.py 2>&1 | tee "$out/gpu_tests_tma.log" | tail -5
# 1c. TUNE=1: sweep tile configs of the GMM / dlhs / TGMM, row-gathering TGMM and SwiGLU kernels on TUNE_SHAPES
#     (benchmarks/tune.py, TUNE_KINDS / TUNE_BUDGET, about budget + 5 s per problem). GMM winners go to
#     $out/tuning.json, which the suites below then use (pick_config prefers cached winners); gather_tgmm and SwiGLU
#     winners are printed. Promote lasting ones into the tables.
if [ "${TUNE:-0}" = 1 ]; then
  export MOE_OPS_TUNING_CACHE="$out/tuning.json"
  timeout "${TUNE_TIMEOUT:-420}" python3 -m benchmarks.tune --shapes "${TUNE_SHAPES:-qwen3-30b-w1,decode}" \
    --kinds "${TUNE_KINDS:-gmm,dlhs,tgmm,gather_tgmm,swiglu,swiglu_bwd}" --budget-s "${TUNE_BUDGET:-20}" \
    --json "$out/tune.json" --write-cache 2>&1 | tee -a "$out/run.log" | tail -60
fi
# 2. The suites, one time limit each; every figure is a ratio to peers and ceilings measured in the same run. A
#    suite stopped by its limit (SIGTERM) still prints and writes every finished case; -k 30 kills it if it hangs.
if [ "$quick" = 1 ]; then
  # GMM_SHAPES / GMM_PEERS / GMM_TIMEOUT widen the GMM suite; SKEW_SHAPES adds balanced vs hot:1:4 (4x skew) side
  # by side on the pointer kernel; LAYER_SHAPES (default qwen3-30b; gpt-oss adds gpt-oss's expert form) the layer's.
  [ "${GMM:-1}" = 1 ] && timeout -k 30 "${GMM_TIMEOUT:-170}" python3 -m benchmarks gmm --impl triton \
    --shapes "${GMM_SHAPES:-mixtral-w1,qwen3-30b-w1,decode}" --patterns balanced \
    --peers "${GMM_PEERS:-lax.ragged_dot,torch._grouped_mm,torch.bmm}" --no-progress --json "$out/gmm.json" 2>&1 \
    | tee -a "$out/run.log" | tail -30
  [ "${LAYER:-1}" = 1 ] && timeout -k 30 "${LAYER_TIMEOUT:-120}" python3 -m benchmarks layer --impl triton \
    --shapes "${LAYER_SHAPES:-qwen3-30b}" --patterns balanced --peers "${LAYER_PEERS:-lax.ragged_dot}" --no-progress \
    --json "$out/layer.json" 2>&1 | tee -a "$out/run.log" \
    | tail -25
  # The fused layer's kernels one by one against the compositions they replaced (benchmarks/pieces.py; PIECES=0
  # skips them).
  [ "${PIECES:-1}" = 1 ] && timeout 90 python3 -m benchmarks.pieces --shapes qwen3-30b --json "$out/pieces.json" 2>&1 \
    | tee -a "$out/run.log" | tail -10
  # PROFILE=1: Nsight Compute counters of one call of each PROFILE_TARGETS at PROFILE_SHAPE (benchmarks/profile.py:
  #   DRAM bytes vs compulsory, L2 hit rate, tensor-pipe use, warp stalls), ours beside the peers.
  [ "${PROFILE:-0}" = 1 ] && timeout -k 30 "${PROFILE_TIMEOUT:-300}" python3 -m benchmarks.profile \
    --shape "${PROFILE_SHAPE:-qwen3-30b-w1}" --targets "${PROFILE_TARGETS:-gmm,torch._grouped_mm,torch.bmm}" \
    --timeout-s 120 --json "$out/profile.json" 2>&1 | tee -a "$out/run.log" | tail -20
  if [ -n "${SKEW_SHAPES:-}" ]; then
    timeout -k 30 "${SKEW_TIMEOUT:-120}" python3 -m benchmarks gmm --impl triton --variants pointer --shapes "$SKEW_SHAPES" \
      --patterns balanced,hot:1:4 --peers torch._grouped_mm --no-progress --json "$out/gmm_skew.json" 2>&1 \
      | tee -a "$out/run.log" | tail -20
  fi
  exit 0  # at most 8 files come back from a lease: the JSONs, env.txt, gpu_tests.log and run.log
fi
for suite in gmm sort layer; do
  timeout -k 30 540 python3 -m benchmarks "$suite" --json "$out/$suite.json" --plot "$out/$suite.png" --no-progress \
    2>&1 | tee "$out/$suite.log" | tail -40
done
