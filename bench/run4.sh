#!/usr/bin/env bash
# Device run 4: final kernel GPU tests, FlashInfer graph/subgroup tests, `arfuse bench` TP4 (4096, 8192) and TP2.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
source .gpu-deps/install-on-gpu.sh > $OUT/fi_install.log 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
R=$OUT/r; mkdir -p $R
pack() { (cd $OUT && tar -czf results.tgz r); }
echo "== pytest triton_symm"; ARFUSE_RESULTS_DIR=$R ARFUSE_TIMEOUT_S=5 timeout 215 python3 -m pytest -p no:cacheprovider tests/gpu/test_triton_symm.py -q 2>&1 | tee $R/pytest_triton_symm.log | tail -4; pack
echo "== pytest flashinfer"; ARFUSE_RESULTS_DIR=$R timeout 100 python3 -m pytest -p no:cacheprovider tests/gpu/test_flashinfer_gpu.py -q -k "graph or subgroup" 2>&1 | tee $R/pytest_flashinfer.log | tail -4; pack
echo "== bench tp4"; timeout 150 python3 -m arfuse.cli.main bench --world-sizes 4 --hidden 4096,8192 --no-progress --json $R/bench_tp4.json --plot $R/bench_tp4.png > $R/bench_tp4.txt 2>&1; tail -c 3500 $R/bench_tp4.txt; pack
echo "== bench tp2"; timeout 85 python3 -m arfuse.cli.main bench --world-sizes 2 --hidden 8192 --no-progress --json $R/bench_tp2.json --plot $R/bench_tp2.png > $R/bench_tp2.txt 2>&1; tail -c 1500 $R/bench_tp2.txt; pack
