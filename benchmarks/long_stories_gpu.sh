#!/usr/bin/env bash
# Issue 24 on one H200: the long-context demo models (MoGA and its dense twin, trained side by side on the one GPU)
# and the comparison of every mode on the same held-out long stories. Three device calls of < 10 minutes:
#
#   bash benchmarks/long_stories_gpu.sh train     # both models at once, BUDGET s of training each (default 450)
#   bash benchmarks/long_stories_gpu.sh compare   # dense, MoGA, window, top-k, training-free lse (+ warm-up)
#   bash benchmarks/long_stories_gpu.sh sol       # Sol-Attn rows (carry .ck: `bash benchmarks/step_speed.sh prepare`)
#                                                 # + the long MoGA model on the short world's held-out sets
#
# RUN (default $HOME/moga-long) holds the runs outside the tree, so the calls must follow one another while the
# machine is warm; every call also copies what it made under $OUT (the models split into < 16 MiB parts, the
# result JSON, the sheet of every mode's first story).
# Both models start from the shipped 4-shot MoGA file: MoGA keeps its routers; the dense twin drops them
# (`--dense --init`), so both get the same data and the same budget from the same weights.
set -euo pipefail
cmd=${1:-train}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
RUN=${RUN:-$HOME/moga-long}
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-450}
SHIPPED=moga/demo/moga-demo.safetensors
mkdir -p "$RUN" "$OUT"
export PYTHONUNBUFFERED=1
common=(--world long --batch 64 --lr 2e-4 --warmup 40 --object-weight 4 --auto-steps --probe 30
        --budget-seconds "$BUDGET" --resume --time-limit $((BUDGET + 60)) --codec "$SHIPPED" --init "$SHIPPED")
compare=(--checkpoint "$RUN/moga-long/model.safetensors" --dense-checkpoint "$RUN/dense-long/model.safetensors"
         --stories 32 --shots 12 --steps 40 --batch 16 --moga-dense-steps 0.075
         --out "$RUN/long-stories-h200.json" --pictures "$RUN/pictures")
bring_back() { cp "$RUN/long-stories-h200.json" "$OUT/" 2>/dev/null || true
               cp "$RUN/pictures/long-story-modes.jpg" "$OUT/" 2>/dev/null || true; }
case "$cmd" in
train)
  nvidia-smi --query-gpu=name,memory.used --format=csv || true
  python3 -m moga.train demo "${common[@]}" --out "$RUN/moga-long" --context-frames 3 --capacity 1 \
    --capacity-split stride >"$OUT/train-moga-long.log" 2>&1 &
  moga=$!
  python3 -m moga.train demo "${common[@]}" --dense --out "$RUN/dense-long" >"$OUT/train-dense-long.log" 2>&1 &
  dense=$!
  rc=0; wait $moga || rc=$?; wait $dense || rc=$((rc + $?))
  tail -n 3 "$OUT/train-moga-long.log" "$OUT/train-dense-long.log"
  for m in moga-long dense-long; do
    [ -f "$RUN/$m/model.safetensors" ] && split -b 15M -d "$RUN/$m/model.safetensors" "$OUT/$m.safetensors.part"
  done
  exit $rc ;;
compare)
  timeout 560 python3 benchmarks/long_stories.py "${compare[@]}" --modes dense,moga,window,topk,lse,lse-warmup \
    --resume 2>&1 | tee "$OUT/long-stories-compare.log" || echo "compare: exit $?"
  bring_back ;;
sol)
  export PYTHONPATH="$root/.ck${PYTHONPATH:+:$PYTHONPATH}"
  timeout 420 python3 benchmarks/long_stories.py "${compare[@]}" --modes moga,topk,sol,sol-equal --resume \
    2>&1 | tee "$OUT/long-stories-sol.log" || echo "sol: exit $?"
  for seed in 0 2; do
    timeout 150 python3 -m moga.eval demo --checkpoint "$RUN/moga-long/model.safetensors" --modes moga \
      --dense-steps 0.075 --stories 128 --seed $seed --batch 64 --json "$OUT/short-world-after-long-seed$seed.json" \
      2>&1 | tail -4 || echo "short world seed $seed: exit $?"
  done
  bring_back ;;
*) echo "usage: $0 train|compare|sol" >&2; exit 2 ;;
esac
