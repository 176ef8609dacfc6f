#!/usr/bin/env bash
# The GPU suite: every test (the GPU-marked ones included), the kernel table, the end-to-end tables, profiles.
# Usage, from the repository root on a CUDA machine: bash bench/gpu_suite.sh OUTDIR [tests|e2e|e2e2048|all]
#   tests    the test suite and the kernel table (tests.log, kernels.md)                   ~4 min on an H200
#   e2e      1024^2: both models' tables and JSON, the profiles at ratios 0.5 / 0.25 / 0.125   ~5 min
#   e2e2048  2048^2: both models' tables and JSON (Lumina static at 10 steps: diffusers' dense step takes ~1.9 s),
#            then the plot of the static runs found in OUTDIR (speedup.png)                     ~6 min
#   all      all three (default); each part fits one 10-minute device call
# Errors go to OUTDIR/stderr.log. The tests default to RAS_ATTN_AUTOTUNE=0 (tests/conftest.py); the kernel table and
# the e2e runs autotune as users do.
set -uo pipefail
out=${1:-gpu-results}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
err="$out/stderr.log"
python3 -c "import torch, triton, diffusers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/tests.log"
e2e() { echo "### bench.e2e $*"; python3 -m bench.e2e "$@" 2>>"$err"; echo; }
if [ "$part" = tests ] || [ "$part" = all ]; then
  python3 -m pytest -q -p no:cacheprovider --maxfail=20 --durations=10 tests 2>&1 \
    | tee -a "$out/tests.log" | tail -25
  python3 -m bench.kernels --markdown "$out/kernels.md" 2>>"$err" | tail -40
fi
if [ "$part" = e2e ] || [ "$part" = all ]; then
  {
    e2e --model sd3 --ratio 1.0 0.5 0.25 0.125 --json "$out/sd3-1024.json"
    e2e --model lumina --schedule static --ratio 1.0 0.5 0.25 0.125 --json "$out/lumina-1024-static.json"
    e2e --model lumina --ratio 0.5 --no-compile-baseline --json "$out/lumina-1024-dynamic.json"
  } | tee "$out/e2e.md"
  for model in sd3 lumina; do
    for ratio in 0.5 0.25 0.125; do
      echo "# $model, ratio $ratio"
      python3 -m bench.profile_step --model $model --ratio $ratio --top 14
    done
  done 2>>"$err" > "$out/profile.md"
fi
if [ "$part" = e2e2048 ] || [ "$part" = all ]; then
  {
    e2e --model sd3 --resolution 2048 --ratio 1.0 0.5 0.25 0.125 --json "$out/sd3-2048.json"
    e2e --model lumina --resolution 2048 --steps 10 --schedule static --ratio 1.0 0.5 0.25 0.125 \
      --json "$out/lumina-2048-static.json"
    e2e --model lumina --resolution 2048 --ratio 0.5 --no-compile-baseline --json "$out/lumina-2048-dynamic.json"
  } | tee -a "$out/e2e.md"
  jsons=()
  for run in sd3-1024 sd3-2048 lumina-1024-static lumina-2048-static; do
    [ -f "$out/$run.json" ] && jsons+=("$out/$run.json")
  done
  python3 -m bench.plot_e2e "${jsons[@]}" --out "$out/speedup.png" 2>>"$err"
fi
