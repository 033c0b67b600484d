#!/usr/bin/env bash
# Device run 3: v3 kernels (GPU tests incl. the Lamport two-shot), timing beside FlashInfer at TP4/TP2, link bandwidth.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
source .gpu-deps/install-on-gpu.sh > $OUT/fi_install.log 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
echo "== link"; timeout 60 python3 bench/link_bandwidth.py 4 64 2>&1 | tail -4 | tee $OUT/link.txt
echo "== pytest triton_symm"; ARFUSE_RESULTS_DIR=$OUT ARFUSE_TIMEOUT_S=5 timeout 240 python3 -m pytest -p no:cacheprovider tests/gpu/test_triton_symm.py -q 2>&1 | tee $OUT/pytest_triton_symm.log | tail -12
P=triton_symm/lamport,triton_symm/one_shot,triton_symm/two_shot,triton_symm/lamport_two_shot,nccl,flashinfer/oneshot,flashinfer/twoshot
echo "== timing tp4"; timeout 100 python3 bench/kernel_timing.py --world 4 --paths $P --tokens 1,4,16,64,128,256,512,1024,2048 --out $OUT/timing_tp4.json 2>&1 | tail -11
echo "== timing tp2"; timeout 80 python3 bench/kernel_timing.py --world 2 --paths $P --tokens 1,4,16,64,128,256,512,1024,2048 --out $OUT/timing_tp2.json 2>&1 | tail -11
