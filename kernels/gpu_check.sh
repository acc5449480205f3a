#!/usr/bin/env bash
# The whole GPU check in one go, results under $OUT (default gpu-out/): the kernel tests on CUDA,
# the kernel benchmark, and the real-size profile (RL, SFT, reward models, each in its own process
# so that a fault in one leaves the others' numbers). Each part has its own time limit.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then  # wheels carried for a machine that cannot download (diffusers and friends)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, diffusers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${T_TESTS:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py > "$OUT/kernel_tests.log" 2>&1
tail -8 "$OUT/kernel_tests.log"
timeout "${T_BENCH:-90}" python3 kernels/bench_kernels.py --no-tune --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
P="python3 kernels/profile_kontext.py --out $OUT/profile.json"
timeout "${T_RL:-150}" $P --phases rl --update-steps "${UPDATE_STEPS:-8}" 2>&1 | grep -v "Loading weights\|Writing model" | tail -5
timeout "${T_SFT:-110}" $P --phases sft 2>&1 | grep -v "Loading weights\|Writing model" | tail -4
timeout "${T_REWARDS:-90}" $P --phases rewards 2>&1 | grep -v "Loading weights\|Writing model" | tail -4
if grep -q '"phase": "sft-2", *"kernels": "torch", *"error"' "$OUT/profile.json" 2>/dev/null; then
  # a CUDA fault is reported asynchronously; run the first step synchronously to name the failing op
  CUDA_LAUNCH_BLOCKING=1 timeout "${T_DIAG:-60}" python3 kernels/profile_kontext.py --out "$OUT/diag.json" \
    --phases sft --sft-refs 2 --kernels torch --repeats 0 > "$OUT/diag.log" 2>&1
  grep -v "Loading weights" "$OUT/diag.log" | tail -25
fi
echo "gpu_check done"
