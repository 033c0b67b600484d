#!/usr/bin/env bash
# Device run 1: environment facts, kernel smoke, GPU tests of triton_symm, quick timings. Logs under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi; nvidia-smi topo -m; python3 -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'triton', triton.__version__); import torch.distributed._symmetric_memory as s; print('signal pad', getattr(s, 'get_signal_pad_size', lambda: 'n/a')())"; } > $OUT/env.txt 2>&1
tail -3 $OUT/env.txt
echo "== smoke tp2"; ARFUSE_TIMEOUT_S=5 timeout 150 python3 bench/gpu_smoke.py 2 2>&1 | tee $OUT/smoke2.log | tail -45
echo "== smoke tp4"; ARFUSE_TIMEOUT_S=5 timeout 120 python3 bench/gpu_smoke.py 4 2>&1 | tee $OUT/smoke4.log | grep -c "^ok"
echo "== timing tp4"; timeout 100 python3 bench/kernel_timing.py --world 4 --out $OUT/timing_tp4.json 2>&1 | tail -12
echo "== pytest gpu"; ARFUSE_RESULTS_DIR=$OUT ARFUSE_TIMEOUT_S=5 timeout 200 python3 -m pytest -p no:cacheprovider tests/gpu/test_triton_symm.py -x -q 2>&1 | tail -25
