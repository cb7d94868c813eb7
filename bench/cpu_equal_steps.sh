#!/usr/bin/env bash
# Chapter 8's CPU comparison at equal work (issue 19): hybrid, attention-only and Mamba-only, the
# same number of steps each (no time budget), on text and on MQAR (8 pairs), same data and seed.
# Logs under bench/results/cpu_equal_steps/; the summary line of each run is its last.
#     bash bench/cpu_equal_steps.sh [TEXT_STEPS] [MQAR_STEPS]
set -u
cd "$(dirname "$0")/.."
out=bench/results/cpu_equal_steps
mkdir -p "$out"
for layout in hybrid attention mamba; do
  python train_tiny.py --layout $layout --max-steps "${1:-400}" --time-budget 0 --out-dir /tmp/eq-text-$layout \
    --overwrite > "$out/text-$layout.log" 2>&1
  python train_tiny.py --task mqar --layout $layout --max-steps "${2:-600}" --time-budget 0 \
    --out-dir /tmp/eq-mqar-$layout --overwrite > "$out/mqar-$layout.log" 2>&1
  tail -1 "$out/text-$layout.log" | cut -c1-200; tail -2 "$out/mqar-$layout.log" | head -1 | cut -c1-200
done
