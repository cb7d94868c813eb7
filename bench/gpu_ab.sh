#!/usr/bin/env bash
# Issue 16 on one GPU: the commit before the redesign against the redesign, each bench run in one
# process after the other, in one device run. Trees: .ab/before and .ab/after (git archive of each
# commit, carried with the run). Phases, in the order given:
#
#   tests    the GPU tests of the redesigned tree (backends, projections, conv, decoding graphs)
#   decode   bench/gpu_decode_batched.py: Jamba-v0.1, int8 experts, 8K context, batch 1/16/64,
#            the plain projections of a decoding step against the time-last ones (the layout before)
#   scan     bench/gpu_scan.py, triton rows at 2K/8K/32K, before then after
#   e2e      bench/gpu_e2e.py, the compiled rows' train, prefill and decode, before then after
#
#   bash bench/gpu_ab.sh tests decode        # $OUT receives one log and one JSON per step
#   E2E_ONLY=compile_graphs_bf16 E2E_WHAT=train E2E_BUDGET=300 bash bench/gpu_ab.sh e2e   # a subset
set -uo pipefail
OUT=${OUT:-out/ab}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for phase in "$@"; do
  case $phase in
    tests)
      (cd .ab/after && python3 -m pytest -q -x -p no:cacheprovider tests/test_backends.py tests/test_layout.py \
        tests/test_conv.py tests/test_decode_graph.py tests/test_moe.py 2>&1 | tail -15) | tee "$OUT/tests.log" ;;
    decode)
      python3 .ab/after/bench/gpu_decode_batched.py --batches 1 16 64 --context 8192 \
        --out "$OUT/decode_batched.json" 2>&1 | tee "$OUT/decode_batched.log" ;;
    scan)
      for tree in ${SCAN_TREES:-before after}; do
        python3 .ab/$tree/bench/gpu_scan.py --lengths 2048,8192,32768 --backends triton --check-lengths 2048 \
          --out "$OUT/scan_$tree" 2>&1 | tail -25 | tee "$OUT/scan_$tree.log"
      done ;;
    e2e)
      for tree in ${E2E_TREES:-before after}; do
        python3 .ab/$tree/bench/gpu_e2e.py --only ${E2E_ONLY:-compile compile_graphs_bf16} --what ${E2E_WHAT:-train prefill decode} \
          --no-profile --budget ${E2E_BUDGET:-200} --out "$OUT/e2e_$tree.json" 2>&1 | tail -30 | tee "$OUT/e2e_$tree.log"
      done ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
