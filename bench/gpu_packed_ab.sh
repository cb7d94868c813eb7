#!/usr/bin/env bash
# Issue 20's second pass on one GPU: the packed-training benches of the commit before (.ab/before,
# git archive of it, carried with the run) against the working tree, one process after the other.
#   bash bench/gpu_packed_ab.sh      # $OUT receives packed_before.json, packed_after.json and logs
set -uo pipefail
OUT=${OUT:-out/packed_ab}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for tree in before after; do
  dir=.ab/$tree; [ $tree = after ] && dir=.
  (cd $dir && python3 bench/gpu_packed.py --only ${PACKED_ONLY:-scan attention train} --out "$OUT/packed_$tree.json") 2>&1 \
    | grep -v Warning | tail -20 | tee "$OUT/packed_$tree.log"
done
