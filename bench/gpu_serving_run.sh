#!/usr/bin/env bash
# One device run for issue 17 (and issue 16's causal-conv1d check): install the prebuilt mamba-ssm and
# causal-conv1d (carried as .whl/both.tar.xz, the two wheels unpacked: see ../shared/wheels/README.md),
# run the GPU-only tests, time the decoding step of the commit before the serving change (.ab/before,
# carried) against this tree's in the same process order, then bench/gpu_serving.py.
#     bash bench/gpu_serving_run.sh [gpu_serving.py arguments]     (logs and JSON under $OUT)
set -u
mkdir -p "${OUT:-out/bench}" /tmp/site
OUT=$(cd "${OUT:-out/bench}" && pwd)
if [ -f .whl/both.tar.xz ]; then tar xJf .whl/both.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site; fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
timeout 150 python -m pytest -q -x tests/test_conv.py -k "causal_conv1d_and or mamba_ssm" \
  tests/test_decode_graph.py tests/test_serving.py > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
tail -3 "$OUT/tests.log"
for tree in $([ "${AB:-1}" = 1 ] && echo before after); do  # AB=0 skips the A/B
  dir=$([ $tree = before ] && echo .ab/before || echo .)
  (cd "$dir" && timeout 90 python bench/gpu_decode_batched.py --batches 1 16 64 --projections plain \
     --out "$OUT/decode_$tree.json") > "$OUT/decode_$tree.log" 2>&1
  grep RESULT "$OUT/decode_$tree.log" | cut -c1-160
done
timeout ${SERVING_TIMEOUT:-330} python bench/gpu_serving.py --out "$OUT/serving.json" "$@" > "$OUT/serving.log" 2>&1
echo "serving rc=$?"; grep -c RESULT "$OUT/serving.log"
