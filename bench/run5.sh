#!/usr/bin/env bash
# Device run 5: end to end, Llama-3-70B shapes (80 layers, random weights) at TP4: TTFT and TPOT, fused vs unfused.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
source .gpu-deps/install-on-gpu.sh > $OUT/fi_install.log 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
timeout ${E2E_S:-230} python3 -m arfuse.cli.main e2e --preset llama3-70b --tp 4 --backends unfused,auto,flashinfer \
  --prompt-lens 128,512,2048 --batches 1,8,32,64 --kv-len 1024 --json $OUT/e2e_llama3-70b_tp4.json > $OUT/e2e.txt 2>&1
echo "rc=$?"; tail -c 5000 $OUT/e2e.txt
