#!/usr/bin/env bash
# Device run 6: TP4 correctness matrix of every kernel variant (after the FMA fix) and the Lamport timeouts.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
source .gpu-deps/install-on-gpu.sh > $OUT/fi_install.log 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
ARFUSE_RESULTS_DIR=$OUT ARFUSE_TIMEOUT_S=5 timeout ${T:-200} python3 -m pytest -p no:cacheprovider tests/gpu/test_triton_symm.py -q \
  -k "matches_reference and 4 or missing_peer and lamport" 2>&1 | tee $OUT/pytest_triton_symm_tp4.log | tail -6
