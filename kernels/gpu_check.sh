#!/usr/bin/env bash
# The whole GPU check in one go, results under $OUT (default gpu-out/): the kernel tests on CUDA,
# the kernel benchmark, and the real-size profile of SFT and RL. Each part has its own time limit,
# so a part that runs long leaves the others' results intact.
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
timeout "${T_TESTS:-110}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py > "$OUT/kernel_tests.log" 2>&1
tail -25 "$OUT/kernel_tests.log"
timeout "${T_BENCH:-170}" python3 kernels/bench_kernels.py --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
timeout "${T_PROFILE:-270}" python3 kernels/profile_kontext.py --out "$OUT/profile.json" --kernels torch,triton \
  --update-steps "${UPDATE_STEPS:-8}" 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/profile.log"
echo "gpu_check done"
