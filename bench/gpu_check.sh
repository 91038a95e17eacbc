#!/usr/bin/env bash
# One command on a GPU machine: the GPU test subset, then the full benchmark at 9 stages, all written to OUT_DIR,
# a short summary table printed last. Budget: about 10 minutes (each step has its own time limit).
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Installs the project without dependencies (the GPU image has torch and triton; nothing is downloaded).
set -uo pipefail
out="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
py="${PYTHON:-python3}"

{ date -u; nvidia-smi; "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$out/machine.txt" 2>&1
"$py" -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
    || echo "install failed: see $out/install.log"

# 1. Correctness on the device: every kernel test compiled for the GPU (two tile configs each, one at 8 warps),
#    the fused layer and model tests, and everything marked gpu.
LORUN_FAST_TUNE=0 timeout 200 "$py" -m pytest tests/test_lora_conv.py tests/test_gd_step.py \
    tests/test_lora_conv_layer.py tests/test_reference_dun.py tests/test_adapter_sets.py -q -rfEs \
    --junitxml="$out/gpu-tests.xml" \
    > "$out/gpu-tests.log" 2>&1
tests_rc=$?

# 2. The benchmark report at full size (autotuned kernels), CS 25%, 9 stages, with the kernels' quick shapes
#    (fp32/TF32 and bf16). The full kernel grids: bench/lora_conv.py and bench/gd_step.py, run on their own.
#    Its kernel rows time both designs of the LoRA convolution side by side (lora-conv/fused-triton is v2,
#    lora-conv/fused-triton-v1 the earlier one), and its lorun-fused model runs v2.
timeout 260 "$py" bench/run.py --stages 9 --checkpointing --out "$out/run" > "$out/run.log" 2>&1
run_rc=$?

# 3. The same DUN rows with the v1 convolution inside lorun-fused (model level v1 vs v2, same shapes).
LORUN_FAST_CONV_KERNEL=v1 timeout 120 "$py" bench/run.py --stages 9 --no-sweep --no-kernels --out "$out/run-v1" \
    > "$out/run-v1.log" 2>&1
v1_rc=$?

# 4. Mixed adapter batches: one pass (indexed kernels) vs K batched calls vs a loop, 3 sets, batch 24, 256².
timeout 90 "$py" bench/adapter_sets.py --out "$out/adapter-sets" > "$out/adapter-sets.log" 2>&1
sets_rc=$?

echo "== gpu_check: $(head -n 1 "$out/machine.txt") =="
grep -m1 -E "NVIDIA (H|A)[0-9]+" "$out/machine.txt" || true
echo "GPU tests (rc $tests_rc): $(tail -n 1 "$out/gpu-tests.log")"
grep -E "^(FAILED|ERROR)" "$out/gpu-tests.log" | head -n 15
echo "benchmark (rc $run_rc): $out/run/results.json"
sed -n '/^DUN providers/,/^Stage sweep/p' "$out/run.log" | head -n 30
grep -E "^lora-conv/|^gd-step/" "$out/run.log" | grep -E "fused|triton" | head -n 24
echo "lorun-fused with the v1 convolution (rc $v1_rc):"
grep -E "^lorun-fused" "$out/run-v1.log" | head -n 4
echo "mixed adapter batches (rc $sets_rc):"
grep -E "^(mixed|separate|loop) " "$out/adapter-sets.log" | head -n 3
exit $(( tests_rc != 0 || run_rc != 0 || v1_rc != 0 || sets_rc != 0 ))
