#!/usr/bin/env bash
# The whole GPU check of issue 28 in one device call, inside 8 minutes, writing ONE JSON:
#   $OUT/gpu_check.json  card and versions, each part's exit status and seconds, the kernel tests
#                        compiled (bf16 and fp16), the attention-block benchmark (eager / compiled /
#                        fused), the real-size profile (SFT 2/3/4 refs, one RL iteration, the reward
#                        models, each with peak memory) and the GPU-hours of the paper's recipe
#   $OUT/gpu_check.log   everything printed, for when a part fails
#
# On the lent GPU, from the repository root, as one `run` of the device tool with carry [".whl"]:
#   bash kernels/gpu_check.sh
# Here, on the CPU, every part at toy size through the same code (tests/test_kernels.py runs this):
#   GPU_CHECK_SMALL=1 OUT=/tmp/gc bash kernels/gpu_check.sh
#
# The GPU image has torch 2.11, triton 3.6, transformers and peft but no diffusers; the wheels travel
# in .whl/ (ignored by git) and are installed into /tmp/site. Make them here, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 regex==2026.11.19
# (transformers and peft at the versions the code is tested with; regex because transformers 5.24
# checks for a recent one at import; 21 MB in all.)
#
# Time limits per part (seconds, env overrides), each cut to what is left of BUDGET (470) so the
# report still gets written inside 8 minutes: T_TESTS 80, T_BENCH 110, T_SFT 90, T_RL 110, T_REWARDS 70.
set -u
OUT=${OUT:-gpu-out}
WORK=${WORK:-$(mktemp -d)}
BUDGET=${BUDGET:-470}
SMALL=${GPU_CHECK_SMALL:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$SECONDS

part() {  # part NAME LIMIT CMD...: CMD under min(LIMIT, what is left of BUDGET), recorded in parts.jsonl
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "{\"part\": \"$name\", \"skipped\": \"out of time\"}" >>"$WORK/parts.jsonl"
    return
  fi
  echo "=== $name (limit ${limit}s, ${left}s left)"
  local t0=$SECONDS rc
  timeout -k 5 "$limit" "$@"
  rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit, \"timed_out\": $([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)}" >>"$WORK/parts.jsonl"
}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$SMALL" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  echo "cpu (GPU_CHECK_SMALL=1: toy sizes, Triton's interpreter)" >"$WORK/gpu.txt"
  TESTS=(-k "qk_norm_rope_single_stream or refuses_bad_tables")
  BENCH=(--small --compile-backend aot_eager --no-reward-ops)
  PROF=(--small --device cpu --kernels torch --repeats 1)
else
  export TRITON_INTERPRET=0
  if [ -d .whl ]; then  # diffusers and friends, carried (see above)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$WORK/gpu.txt"
  TESTS=(-k "not profile_script and not gpu_check")
  BENCH=()
  PROF=(--kernels torch,triton --update-steps "${UPDATE_STEPS:-4}")
fi
$PY -c "import torch, triton, transformers, diffusers, peft; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| diffusers', diffusers.__version__, '| peft', peft.__version__)" >>"$WORK/gpu.txt"
cat "$WORK/gpu.txt"

# 1. the kernel tests (compiled on CUDA: bf16 and fp16, Kontext-like shapes, every autotuner tile)
part tests "${T_TESTS:-80}" $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py "${TESTS[@]}" \
  --junitxml="$WORK/tests_$([ "$SMALL" = 1 ] && echo interp || echo cuda).xml"
# 2. the attention block, eager / compiled / fused, and the reward ops
part bench "${T_BENCH:-110}" $PY kernels/bench_kernels.py "${BENCH[@]}" --out "$WORK/bench.json"
# 3. the real-size profile, one process per phase so that a fault in one leaves the others' rows
P=($PY kernels/profile_kontext.py --out "$WORK/profile.json" "${PROF[@]}")
part sft "${T_SFT:-90}" "${P[@]}" --phases sft
part rl "${T_RL:-110}" "${P[@]}" --phases rl
part rewards "${T_REWARDS:-70}" "${P[@]}" --phases rewards
# 4. one JSON, with the GPU-hours worked out
timeout 60 $PY kernels/profile_kontext.py --report "$WORK" --out "$OUT/gpu_check.json"
echo "gpu_check done in $((SECONDS - START)) s: $OUT/gpu_check.json"
