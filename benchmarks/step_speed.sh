#!/usr/bin/env bash
# step_speed.sh: issue 25's GPU measurements in one device call (~6-7 minutes on one H200).
#
#   bash benchmarks/step_speed.sh prepare   # here, once: comfy-kitchen (PyPI wheel, HIP backend left out:
#                                           # 41 MB instead of 68) unpacked into .ck/ (git-ignored)
#   device run, carry [".ck"] (plus flash-attn-4 as ../shared/tools/fa4-wheels.sh installs it):
#       bash benchmarks/step_speed.sh run
#   round two (fused residual passes; issue 25), flash-attn-4 installed, nothing carried:
#       bash benchmarks/step_speed.sh fused       # -> dit-step-speed2-h200.json
#
# run writes under $OUT (default benchmarks/results): attention-peers-h200.json (dense fa4, MoGA, Sol-Attn,
# INT8 at 187,200 / 561,600 tokens) and dit-step-speed-h200.json (14B config, 3 random bf16 blocks scaled to
# 40: baseline / fused / fp8 / fused with 65,536-token chunks at 262,080 tokens M=16 and 561,600 tokens M=20,
# capacity 1, calibrated routers; the profile by op family at 262,080; fp8 output error vs the baseline).
set -euo pipefail
cmd=${1:-run}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
case "$cmd" in
prepare)
  grep -qx '/.ck/' .git/info/exclude 2>/dev/null || echo '/.ck/' >>"$(git rev-parse --git-path info/exclude)"
  rm -rf .ck /tmp/ck-wheel && mkdir -p .ck /tmp/ck-wheel
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d /tmp/ck-wheel comfy-kitchen
  python3 -m zipfile -e /tmp/ck-wheel/comfy_kitchen-*.whl .ck/
  rm -rf .ck/comfy_kitchen/backends/hip        # AMD only; comfy_kitchen imports it optionally
  du -sh .ck ;;
run)
  OUT=${OUT:-benchmarks/results}
  mkdir -p "$OUT"
  export PYTHONPATH="$root/.ck${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv || true
  timeout 200 python3 benchmarks/attention.py --peers --budget-s 150 --json "$OUT/attention-peers-h200.json" \
    2>&1 | tee "$OUT/attention-peers.log" || echo "peers: exit $?"
  timeout 330 python3 benchmarks/dit.py --models 14B --blocks 3 --tokens 262080,561600 --groups 16,20 \
    --groups-per-size --capacity 1 --no-dense --variants baseline,fused,fp8 --chunks 16384,65536 \
    --profile --repeats 2 --budget-s 270 --json "$OUT/dit-step-speed-h200.json" \
    2>&1 | grep -v '^USDT' | tee "$OUT/dit-step-speed.log" || echo "dit: exit $?" ;;
fused)
  # round two (the residual updates fused into the next norm, e4m3 straight from the norms and GELU),
  # next to round one's kernels (-r1), no peers: ~6 minutes on one H200, nothing to carry
  OUT=${OUT:-benchmarks/results}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv || true
  timeout 400 python3 benchmarks/dit.py --models 14B --blocks 3 --tokens 262080,561600 --groups 16,20 \
    --groups-per-size --capacity 1 --no-dense --variants baseline,fused-r1,fused,fp8-r1,fp8 \
    --profile --repeats 2 --budget-s 330 --json "$OUT/dit-step-speed2-h200.json" \
    2>&1 | grep -v '^USDT' | tee "$OUT/dit-step-speed2.log" || echo "dit: exit $?" ;;
*) echo "usage: $0 prepare|run|fused" >&2; exit 2 ;;
esac
