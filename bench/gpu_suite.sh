#!/usr/bin/env bash
# The GPU suite: every test (the GPU-marked ones included), the kernel table, the end-to-end tables, a profile.
# Usage, from the repository root on a CUDA machine: bash bench/gpu_suite.sh OUTDIR [tests|e2e|all]
#   tests  the test suite and the kernel table (tests.log, kernels.md)                      ~5 min on an H200
#   e2e    the end-to-end tables, their JSON and plot, the profiles (e2e.md, *.json, speedup.png, profile.md)
#          ~9 min on an H200 (each part fits one 10-minute device call)
#   all    both (default)
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
if [ "$part" != e2e ]; then
  python3 -m pytest -q -p no:cacheprovider --maxfail=20 --durations=10 tests 2>&1 \
    | tee -a "$out/tests.log" | tail -25
  python3 -m bench.kernels --markdown "$out/kernels.md" 2>>"$err" | tail -40
fi
[ "$part" = tests ] && exit 0
e2e() { echo "### bench.e2e $*"; python3 -m bench.e2e "$@" 2>>"$err"; echo; }
{
  e2e --model sd3 --ratio 1.0 0.5 0.25 0.125 --json "$out/sd3-1024.json"
  e2e --model sd3 --resolution 2048 --ratio 0.5 0.25 0.125 --no-compile-baseline --json "$out/sd3-2048.json"
  e2e --model lumina --schedule static --ratio 1.0 0.5 0.25 0.125 --json "$out/lumina-1024-static.json"
  e2e --model lumina --ratio 0.5 --no-compile-baseline --json "$out/lumina-1024-dynamic.json"
} | tee "$out/e2e.md"
python3 -m bench.plot_e2e "$out/sd3-1024.json" "$out/sd3-2048.json" "$out/lumina-1024-static.json" \
  --out "$out/speedup.png" 2>>"$err"
{
  python3 -m bench.profile_step --model sd3 --ratio 0.25
  python3 -m bench.profile_step --model lumina --ratio 0.25
} 2>>"$err" | tee "$out/profile.md" | head -60
