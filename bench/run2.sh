#!/usr/bin/env bash
# Device run 2: v2 kernels (full GPU tests + timing beside FlashInfer), FlashInfer GPU tests, doctor.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
source .gpu-deps/install-on-gpu.sh --check > $OUT/fi_install.log 2>&1; tail -2 $OUT/fi_install.log
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
echo "== pytest triton_symm"; ARFUSE_RESULTS_DIR=$OUT ARFUSE_TIMEOUT_S=5 timeout 200 python3 -m pytest -p no:cacheprovider tests/gpu/test_triton_symm.py -x -q 2>&1 | tail -15
echo "== timing tp4"; timeout 130 python3 bench/kernel_timing.py --world 4 --out $OUT/timing_tp4.json 2>&1 | tail -9
echo "== pytest flashinfer"; ARFUSE_RESULTS_DIR=$OUT timeout 150 python3 -m pytest -p no:cacheprovider tests/gpu/test_flashinfer_gpu.py -x -q 2>&1 | tail -15
echo "== doctor"; timeout 30 python3 -m arfuse.cli.doctor --json > $OUT/doctor.json 2>&1; head -c 600 $OUT/doctor.json
