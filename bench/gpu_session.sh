#!/usr/bin/env bash
# Everything the GPU machine runs, by stage, in one device call:
#   bash bench/gpu_session.sh STAGE...      (carry .gpu-deps, built by ../shared/tools/gpu-deps.sh, for FlashInfer)
# Stages: env link kernels fp8 flashinfer models reliability timing lamport_sweep benchtest bench e2e (4 GPUs);
# demo e2e_rank patterns epilogue launches moe_prologue epilogue_ranges autofuse e2e_hf host virtual virtualtest
# (one GPU is enough); each bounded by its own timeout.
# Results land in $OUT/r and are packed into $OUT/results.tgz after every stage (the device returns at most 8
# files, so unpack that one). NVLink multicast stays off: the guards below are exported before anything runs.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -f .gpu-deps/install-on-gpu.sh ]; then source .gpu-deps/install-on-gpu.sh > "$OUT/fi_install.log" 2>&1; fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_DEVICE_MAX_CONNECTIONS=32  # virtual ranks: one hardware queue per rank's stream
export PYTHONPATH=$PWD:${PYTHONPATH:-}
R=$OUT/r
mkdir -p "$R"

gpu_tests() {  # name file timeout [pytest args...]; returns pytest's status
  local name=$1 file=$2 limit=$3 rc; shift 3
  ARFUSE_RESULTS_DIR=$R ARFUSE_TIMEOUT_S=5 timeout "$limit" python3 -m pytest -p no:cacheprovider "$file" -q "$@" \
    > "$R/pytest_$name.log" 2>&1
  rc=$?
  tail -3 "$R/pytest_$name.log"
  return $rc
}

evidence() {  # path kind world_sizes test_file log [any-world-size reason]: the verification record's entry for a
  local passed  # path its test run checked; none if any test was skipped, xfailed or deselected (it vouches for all)
  if [ -z "${RESULTS_DIR:-}" ]; then echo "evidence: set RESULTS_DIR (where the results will be committed)"; return 1; fi
  if tail -1 "$5" | grep -qE 'skipped|xfailed|xpassed|deselected'; then echo "evidence: not all tests ran: none"; return 1; fi
  passed=$(grep -oE '[0-9]+ passed' "$5" | tail -1 | cut -d' ' -f1)
  python3 bench/verify_kernels.py evidence --path "$1" --kind "$2" --world-sizes "$3" --cases "${passed:-0}" \
    --dtypes bfloat16,float16,float32 --any-world-size "${6:-}" --results-dir "$RESULTS_DIR" --checked-by "$4" \
    --json "$R/evidence_${1//\//_}.json"
  echo "evidence for $1: $R/evidence_${1//\//_}.json"
}

for stage in "$@"; do
  echo "== $stage"
  stage_start=$SECONDS
  case $stage in
    env) { nvidia-smi; nvidia-smi topo -m; python3 -c "import sys, torch, triton; print(sys.version); print('torch',
           torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'triton', triton.__version__)"
         } > "$R/env.txt" 2>&1; tail -2 "$R/env.txt" ;;
    link) timeout 60 python3 bench/link_bandwidth.py 4 64 2>&1 | tail -4 | tee "$R/link_bandwidth.txt" ;;
    kernels) gpu_tests triton_symm tests/gpu/test_triton_symm.py "${T_KERNELS:-420}" ;;  # ~6 min on 4 H200s
    fp8) gpu_tests fp8 tests/gpu/test_triton_symm.py "${T_FP8:-150}" -k fp8 ;;
    flashinfer) gpu_tests flashinfer tests/gpu/test_flashinfer_gpu.py "${T_FLASHINFER:-240}" ;;
    models) gpu_tests models tests/gpu/test_models_gpu.py "${T_MODELS:-240}" ;;
    autofuse) gpu_tests autofuse tests/gpu/test_autofuse_gpu.py "${T_AUTOFUSE:-300}" ;;  # arfuse.compile, 1 GPU
    reliability) gpu_tests reliability tests/gpu/test_reliability_gpu.py "${T_RELIABILITY:-420}" ;;
    timing) timeout "${T_TIMING:-120}" python3 bench/kernel_timing.py --world 4 --out "$R/kernel_timing_tp4.json" \
              --tokens "${TIMING_TOKENS:-1,4,16,64,128,256,512,1024,2048}" ${TIMING_PATHS:+--paths "$TIMING_PATHS"} \
              2>&1 | tail -14 | tee "$R/kernel_timing_tp4.txt" ;;
    lamport_sweep) timeout "${T_SWEEP:-150}" python3 bench/kernel_timing.py --world 4 --lamport-sweep \
                     --tokens 1,4,16,64 --out "$R/lamport_sweep_tp4.json" 2>&1 | tail -6 | tee "$R/lamport_sweep_tp4.txt" ;;
    benchtest) gpu_tests bench tests/gpu/test_bench_gpu.py "${T_BENCHTEST:-300}" -s ;;
    bench) timeout "${T_BENCH:-240}" python3 -m arfuse.cli.main bench --world-sizes 4 --hidden 4096,8192 --no-progress \
             --json "$R/bench_tp4.json" --plot "$R/bench_tp4.png" > "$R/bench_tp4.txt" 2>&1
           timeout "${T_BENCH2:-120}" python3 -m arfuse.cli.main bench --world-sizes 2 --hidden 8192 --no-progress \
             --json "$R/bench_tp2.json" --plot "$R/bench_tp2.png" > "$R/bench_tp2.txt" 2>&1
           tail -c 1500 "$R/bench_tp4.txt" ;;
    e2e) timeout "${T_E2E:-420}" python3 -m arfuse.cli.main e2e --preset llama3-70b --tp 4 \
           --backends unfused,auto,flashinfer --prompt-lens 128,512,2048 --batches 1,8,32,64 --kv-len 1024 \
           --graph-prefill --profile --json "$R/e2e_llama3-70b_tp4.json" > "$R/e2e.txt" 2>&1
         tail -c 2500 "$R/e2e.txt" ;;
    demo) timeout "${T_DEMO:-180}" python3 -m arfuse.cli.main demo > "$R/demo_gpu${WORLD:-}.txt" 2>&1; tail -8 "$R/demo_gpu${WORLD:-}.txt" ;;
    e2e_rank) for attn in ${E2E_ATTENTION:-sdpa triton}; do  # one TP4 rank's shapes on one GPU: the compute floor
           timeout "${T_E2E_RANK:-200}" python3 -m arfuse.cli.main e2e --preset llama3-70b --tp 1 --rank-shapes-of 4 \
             --decode-attention "$attn" --backends "${E2E_RANK_PATHS:-unfused}" --prompt-lens "${E2E_RANK_P:-128,512,2048}" \
             --batches 1,8,32,64 --kv-len 1024 --graph-prefill --profile --json "$R/e2e_rank_tp4_$attn.json" \
             > "$R/e2e_rank_tp4_$attn.txt" 2>&1; tail -c 2500 "$R/e2e_rank_tp4_$attn.txt"; done ;;
    patterns) python3 -m pytest -p no:cacheprovider tests/gpu --co -q > "$R/pytest_collect_gpu.log" 2>&1  # all import
              tail -1 "$R/pytest_collect_gpu.log"
              if ARFUSE_ALLOW_UNVERIFIED=1 gpu_tests patterns tests/gpu/test_patterns_gpu.py "${T_PATTERNS:-270}"; then
                evidence nccl one_gpu 1 tests/gpu/test_patterns_gpu.py "$R/pytest_patterns.log" "the nccl path's own code \
(its two kernels) does not depend on the world size: NCCL's all_reduce runs between them"; fi ;;
    epilogue) timeout "${T_EPILOGUE:-270}" python3 -m arfuse.cli.main bench --epilogue --no-progress --warmup 2 \
                --replays 10 ${EPILOGUE_HIDDEN:+--hidden "$EPILOGUE_HIDDEN"} --json "$R/epilogue_h200.json" \
                > "$R/epilogue_h200.txt" 2>&1; tail -c 4000 "$R/epilogue_h200.txt" ;;
    launches) gpu_tests launches tests/gpu/test_launches_gpu.py "${T_LAUNCHES:-180}" ;;  # every swept launch vs float64
    moe_prologue) timeout "${T_MOE:-240}" python3 -m arfuse.cli.main bench --epilogue --no-progress --warmup 2 --replays 10 \
                    --kinds moe_prologue --hidden "${MOE_HIDDEN:-4096,7168,8192}" \
                    --tokens "${MOE_TOKENS:-1,2,4,8,16,32,64,256,1024,16384}" --json "$R/moe_prologue.json" \
                    --launch-table "$R/launch_table_moe.json" > "$R/moe_prologue.txt" 2>&1
                  echo "rc $?"; tail -c 6000 "$R/moe_prologue.txt" ;;
    epilogue_ranges) timeout "${T_EPILOGUE_RANGES:-330}" python3 -m arfuse.cli.main bench --epilogue --no-progress \
                       --warmup 2 --replays 10 --hidden "${EPILOGUE_HIDDEN:-4096,5120,7168,8192}" \
                       --kinds residual_rmsnorm,offset,fp8_static,fp8_per_token+norm,fp8_group128,fp8_group128_ue8m0,fp8_group128_ue8m0+norm \
                       --json "$R/epilogue_ranges.json" --launch-table "$R/launch_table_epilogue.json" \
                       > "$R/epilogue_ranges.txt" 2>&1
                     echo "rc $?"; tail -c 8000 "$R/epilogue_ranges.txt" ;;
    host) python3 -m pytest -p no:cacheprovider tests/gpu --co -q > "$R/pytest_collect_gpu.log" 2>&1  # all import
          tail -1 "$R/pytest_collect_gpu.log"
          gpu_tests host_fast_path tests/gpu/test_host_fast_path_gpu.py "${T_HOST_TESTS:-150}"
          ARFUSE_ALLOW_UNVERIFIED=1 timeout "${T_HOST:-150}" python3 -m arfuse.cli.main bench --host --device cuda \
            --world-sizes 1 --profile --json "$R/host_gpu.json" > "$R/host_gpu.txt" 2>&1
          tail -c 6000 "$R/host_gpu.txt" ;;
    e2e_hf) hp=${E2E_HF_PRESET:-llama3-8b}  # one GPU: TP1, so arfuse.compile has nothing to fuse (a smoke)
            for mode in ${E2E_HF_MODES:-default}; do
              timeout "${T_E2E_HF:-300}" python3 -m arfuse.cli.main e2e --model hf:llama --preset "$hp" \
                --layers "${E2E_HF_LAYERS:-2}" --tp 1 --prompt-lens "${E2E_HF_P:-128,512}" --batches "${E2E_HF_B:-1,8}" \
                --kv-len 512 --compile-mode "$mode" --json "$R/e2e_hf_${hp}_tp1_$mode.json" > "$R/e2e_hf_${hp}_$mode.txt" 2>&1
              echo "rc $?"; tail -c 2200 "$R/e2e_hf_${hp}_$mode.txt"; done ;;
    virtual) vp=${VIRTUAL_PLAN:-smoke}${VIRTUAL_TIERS:+_tiers${VIRTUAL_TIERS//,/}}  # results for verify_kernels record;
             # a long plan runs in parts: VIRTUAL_PLAN=protocol, then VIRTUAL_TIERS=0 VIRTUAL_PROTOCOL=0 (0 = off), ...
             timeout "${T_VIRTUAL:-540}" python3 bench/verify_kernels.py run --plan "${VIRTUAL_PLAN:-smoke}" --deadline \
               "${VIRTUAL_DEADLINE:-420}" --workers "${VIRTUAL_WORKERS:-14}" --json "$R/virtual_$vp.json" \
               ${VIRTUAL_TIERS:+--tiers "$VIRTUAL_TIERS"} $([ "${VIRTUAL_PROTOCOL:-1}" = 0 ] && echo --no-protocol) \
               > "$R/virtual_$vp.txt" 2>&1
             echo "rc $?"; tail -c 3000 "$R/virtual_$vp.txt" ;;
    virtualtest) gpu_tests virtual_ranks tests/gpu/test_virtual_ranks_gpu.py "${T_VIRTUAL_TESTS:-300}" ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "== $stage took $((SECONDS - stage_start)) s" | tee -a "$R/stage_times.txt"
  (cd "$OUT" && tar -czf results.tgz r)
done
