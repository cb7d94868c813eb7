#!/usr/bin/env bash
# Issue 17's int8 kernel, on the device in two runs (each under the 10-minute limit; at most 8 files back):
#     bash bench/gpu_int8_run.sh sweep                  GPU tests of the kernel, then the tile sweep
#     bash bench/gpu_int8_run.sh serve "KEY=T,O,I,W,S,L ..."
#         the same process order for the current CONFIG and for the given tiles: prefill of one block
#         (bf16 / int8 fused / int8 cast + cuBLAS) and decoding at batch 1 and 64; then the compiled step
#         at batch 1 with the given tiles, and the graph breaks that remain.
#     bash bench/gpu_int8_run.sh rows
#         the multiply-and-sum kernel for a handful of rows: its tile swept against the tl.dot kernel's "gemv"
#         tile, then the decoding step at batch 1 and 2 (graph replay and compiled) and the compiled step's
#         profile, each with ROWS_MAX = -1 (the commit before), then MAGIC off and on, in one process; then
#         the GPU tests of the kernels.
#     bash bench/gpu_int8_run.sh groups                 the prefill tile and GROUP_T swept, then the GPU tests
#     bash bench/gpu_int8_run.sh full
#         all of Jamba-v0.1 (int8 experts, capped at 80 GiB): prefill at 32K and 128K in chunks of 2048 (the
#         fused kernel's rows) and 16384 (the dequantized twin's), each chunk with both kernels, one process
#     bash bench/gpu_int8_run.sh prefill "G:T,O,I,W,S,L"
#         prefill of one block, bf16 / int8 fused / int8 dequantized + grouped GEMM / int8 cast + cuBLAS /
#         int8 as chosen, the fused kernel at GROUP_T = 1 (launch order, the commit before) and at the
#         given group and tile, the dequantized twin at 4 and 1 GiB groups, in one process; GPU tests
set -u
mkdir -p "${OUT:-out/bench}"
OUT=$(cd "${OUT:-out/bench}" && pwd)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
case "$1" in
sweep)
  timeout 150 python -m pytest -q -x tests/test_quant_triton.py > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
  tail -2 "$OUT/tests.log"
  timeout 400 python bench/gpu_int8_sweep.py --tokens 8192 --decode-tokens 1 64 --out "$OUT/int8_sweep.json" \
    > "$OUT/int8_sweep.log" 2>&1; echo "sweep rc=$?"
  grep RESULT "$OUT/int8_sweep.log" ;;
rows)
  timeout 150 python bench/gpu_int8_sweep.py --tokens --rows-tokens 1 2 --out "$OUT/rows_sweep.json" \
    > "$OUT/rows_sweep.log" 2>&1; echo "sweep rc=$?"
  grep RESULT "$OUT/rows_sweep.log"
  grep -h '"kernel": "\(int8 triton \(dot\|rows\)\|bf16\)' "$OUT/rows_sweep.log" | cut -c1-160
  # the tile whose gate/up + down time at batch 1 is least
  best=$(grep -h '^BEST rows=' "$OUT/rows_sweep.log" | cut -d' ' -f2)
  echo "best rows tile: ${best:-none: the tile in the code}"
  ROWS_CONFIG=${best:+--int8-config $best}
  timeout ${STEP_TIMEOUT:-330} python bench/gpu_serving.py --parts batch compile profile --layouts hybrid --batches 1 2 \
    --compile-batches 1 --profile-batches 1 --profile-compile --rows-ab --steps 30 $ROWS_CONFIG \
    --out "$OUT/rows_step.json" > "$OUT/rows_step.log" 2>&1; echo "step rc=$?"
  grep RESULT "$OUT/rows_step.log" | cut -c1-330
  timeout ${TEST_TIMEOUT:-150} python -m pytest -q -x --durations=5 tests/test_quant_triton.py > "$OUT/tests.log" 2>&1
  echo "tests rc=$?" >> "$OUT/tests.log"; tail -8 "$OUT/tests.log" ;;
groups)
  timeout ${SWEEP_TIMEOUT:-360} python bench/gpu_int8_sweep.py --tokens 8192 32768 --groups 1 4 8 16 \
    --out "$OUT/group_sweep.json" > "$OUT/group_sweep.log" 2>&1; echo "sweep rc=$?"
  grep 'RESULT\|BEST' "$OUT/group_sweep.log"
  grep -h '"kernel": "\(int8 reference\|bf16\)' "$OUT/group_sweep.log" | cut -c1-160
  PYTHONUNBUFFERED=1 timeout ${TEST_TIMEOUT:-150} python -m pytest -q -x --durations=5 tests/test_quant_triton.py \
    > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"; tail -8 "$OUT/tests.log" ;;
prefill)
  # the commit before ran the fused kernel at GROUP_T = 1 below LARGE_ROWS = 2048 rows an expert (2K-16K
  # tokens here) and the reference from there (32K); now: GROUP_T = 8, then the dequantized twin
  timeout ${PREFILL_TIMEOUT:-420} python bench/gpu_serving.py --parts prefill --layouts \
    --prefill-modes bf16 int8-triton int8-dequant int8-reference int8-auto --prefill-lens 2048 4096 8192 16384 32768 \
    --prefill-variants 1 "$2" --dequant-gib 4 1 --out "$OUT/prefill.json" > "$OUT/prefill.log" 2>&1; echo "prefill rc=$?"
  grep -h '"part": "prefill"' "$OUT/prefill.log" | cut -c1-260
  PYTHONUNBUFFERED=1 timeout ${TEST_TIMEOUT:-150} python -m pytest -q -x --durations=5 tests/test_quant_triton.py \
    tests/test_quant.py -k "dequant or choice or either_kernel" > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"; tail -8 "$OUT/tests.log" ;;
full)
  PYTHONUNBUFFERED=1 timeout ${FULL_TIMEOUT:-540} python bench/gpu_full_scale.py --scan-backend triton --measure prefill \
    --contexts 32768 131072 --chunk 2048 16384 --int8-kernels triton dequant --budget-gib 80 \
    --out "$OUT/full_prefill.jsonl" > "$OUT/full_prefill.log" 2>&1; echo "full rc=$?"
  grep RESULT "$OUT/full_prefill.log" | cut -c1-300 ;;
serve)
  common=(--parts prefill batch --layouts hybrid --batches 1 64 --prefill-modes bf16 int8-triton int8-reference
          --prefill-lens 2048 8192 32768 --steps 20)
  for tiles in now given; do
    extra=(); [ $tiles = given ] && extra=(--int8-config $2)
    timeout 150 python bench/gpu_serving.py "${common[@]}" "${extra[@]}" --out "$OUT/serve_$tiles.json" \
      > "$OUT/serve_$tiles.log" 2>&1; echo "serve $tiles rc=$?"
    grep -h '"part": "\(prefill\|batch\)"' "$OUT/serve_$tiles.log" | cut -c1-200
  done
  timeout 170 python bench/gpu_serving.py --parts compile --layouts hybrid --compile-batches 1 --int8-config $2 \
    > "$OUT/compile.log" 2>&1; echo "compile rc=$?"; tail -2 "$OUT/compile.log" | cut -c1-300
  timeout 90 python bench/gpu_decode_breaks.py --out "$OUT/breaks.json" > "$OUT/breaks.log" 2>&1; echo "breaks rc=$?"
  tail -5 "$OUT/breaks.log" | cut -c1-300 ;;
esac
