#!/usr/bin/env bash
# Issue 23's GPU table in four device calls that follow one another on one warm machine (30 s idle release):
# benchmarks/patch_path.py (library / patch with the fused block / patch on core's own block / core under
# Sol-Attn) at 262,080 tokens of the 14B config, flash-attn-4 varlen, ComfyUI v0.3.64's model code.
#
#   bash benchmarks/patch_path_gpu.sh prepare     # here, once: .fa4/p1 p2 p3 (flash-attn-4 in parts that fit a
#                                                 # call beside the tree), .comfy (vendored ComfyUI + the wheels
#                                                 # its model code needs that the GPU image lacks), .ck (comfy-kitchen)
#   device run, carry [".fa4/p1"]:            bash benchmarks/patch_path_gpu.sh stage p1
#   device run, carry [".fa4/p2"]:            bash benchmarks/patch_path_gpu.sh stage p2
#   device run, carry [".fa4/p3", ".comfy"]:  bash benchmarks/patch_path_gpu.sh run      # ~6 min
#   device run, carry [".ck"]:                bash benchmarks/patch_path_gpu.sh sol      # every row again + Sol-Attn, 1 repeat
#
# Every call's results land under $OUT (patch_path-h200.json, its log); `run` installs fa4 from the staged parts
# and keeps it in $HOME/fa4-site for `sol`.
set -euo pipefail
cmd=${1:-run}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUT=${OUT:-benchmarks/results}
COMFY_TGZ=comfyui-a125cd8.tgz
fa4_path() { export PYTHONPATH=$HOME/fa4-site:$HOME/fa4-site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}; }
comfy_here() {
  if [ ! -d /tmp/comfy/ComfyUI ]; then
    mkdir -p /tmp/comfy && tar xzf .comfy/$COMFY_TGZ -C /tmp/comfy
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $HOME/comfy-site .comfy/*.whl
  fi
  export COMFYUI_PATH=/tmp/comfy/ComfyUI PYTHONPATH=$HOME/comfy-site${PYTHONPATH:+:$PYTHONPATH}
}
case "$cmd" in
prepare)
  exclude=$(git rev-parse --git-path info/exclude)
  for d in /.fa4/ /.comfy/; do grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"; done
  bash ../shared/tools/fa4-wheels.sh prepare >/dev/null
  big=$(cat .fa4/two/bigname)
  mkdir -p .fa4/p1 .fa4/p2 .fa4/p3
  cat .fa4/one/part.aa .fa4/two/part.ab | split -b 31M - .fa4/whole.
  mv .fa4/whole.aa .fa4/p1/part.aa; mv .fa4/whole.ab .fa4/p2/part.ab; mv .fa4/whole.ac .fa4/p3/part.ac
  echo "$big" >.fa4/p3/bigname
  mv .fa4/two/*.whl .fa4/p3/
  rm -rf .fa4/one .fa4/two
  rm -rf .comfy && mkdir -p .comfy && cp ../shared/vendor/$COMFY_TGZ .comfy/
  for p in torchsde==0.2.6 trampoline==0.1.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .comfy "$p" \
      2>&1 | grep -v '^WARNING' || true
  done
  bash benchmarks/step_speed.sh prepare >/dev/null
  du -sh .fa4/p1 .fa4/p2 .fa4/p3 .comfy .ck ;;
stage)
  mkdir -p $HOME/fa4-stage && cp .fa4/"$2"/part.* $HOME/fa4-stage/ && ls -la $HOME/fa4-stage ;;
run)
  if [ ! -d $HOME/fa4-site/flash_attn ]; then
    for p in part.aa part.ab; do
      [ -f $HOME/fa4-stage/$p ] || { echo "fa4: $p is not staged (the machine went cold): stage p1, p2 again" >&2; exit 1; }
    done
    cat $HOME/fa4-stage/part.aa $HOME/fa4-stage/part.ab .fa4/p3/part.ac >"$HOME/fa4-stage/$(cat .fa4/p3/bigname)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $HOME/fa4-site \
      $HOME/fa4-stage/*.whl .fa4/p3/*.whl
  fi
  fa4_path; comfy_here
  python3 -c "import flash_attn.cute" && echo "fa4 importable"
  mkdir -p "$OUT"
  timeout 540 python3 benchmarks/patch_path.py --repeats 2 --json "$OUT/patch_path-h200.json" 2>&1 |
    tee "$OUT/patch_path-h200.log" ;;
sol)
  fa4_path; comfy_here
  export PYTHONPATH="$root/.ck:$PYTHONPATH"
  mkdir -p "$OUT"
  timeout 560 python3 benchmarks/patch_path.py --repeats 1 --sol --json "$OUT/patch_path-sol-h200.json" \
    2>&1 | tee "$OUT/patch_path-sol-h200.log" ;;
*) echo "usage: $0 prepare|stage p1|stage p2|run|sol" >&2; exit 2 ;;
esac
