#!/bin/bash
# The 2,048-token query-agnostic table of docs/results.md, one task and budget at a
# time (each finishes whole; `namm eval` resumes from predictions.jsonl).
#   bash docs/scripts/qa2k.sh OUT DISTILLED_MIXED_NAMM
set -e
out=${1:-runs/qa2k}; mixed=${2:?a second NAMM folder (the mixed-target fit)}
for tb in needle:0.25 passkey:0.25 needle:0.5 passkey:0.5 kjv_verse:0.25 kjv_verse:0.5 \
          multi_needle:0.25 multi_needle:0.5 chapter:0.25 chapter:0.5; do
  namm eval --out "$out" --policy full,namm,namm2,streaming,h2o,snapkv,tova,knorm,random \
    --namm weights/default --namm2 "$mixed" --tasks "${tb%%:*}" --lengths 2048 --limit 1 \
    --budget "${tb##*:}" --seed 0 --no-progress
done
