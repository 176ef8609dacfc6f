#!/usr/bin/env bash
# The GPU suite: every test (the GPU-marked ones included), the kernel table and the end-to-end tables.
# Usage, from the repository root on a CUDA machine: bash bench/gpu_suite.sh OUTDIR [quick]
# ("quick" skips the end-to-end runs). Logs and markdown tables land in OUTDIR.
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, diffusers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider --maxfail=20 tests 2>&1 | tee "$out/tests.log" | tail -25
python3 -m bench.kernels --markdown "$out/kernels.md" 2>"$out/kernels.err" | tail -40
[ "${2:-}" = quick ] && exit 0
python3 -m bench.e2e --model sd3 --ratio 1.0 0.5 0.25 0.125 --graphs both 2>"$out/e2e_sd3.err" | tee "$out/e2e_sd3.md"
python3 -m bench.e2e --model lumina --schedule static --ratio 1.0 0.25 --graphs both 2>"$out/e2e_lumina.err" \
  | tee "$out/e2e_lumina.md"
python3 -m bench.e2e --model lumina --ratio 0.5 2>>"$out/e2e_lumina.err" | tee -a "$out/e2e_lumina.md"
python3 -m bench.profile_step --model sd3 --ratio 0.25 2>/dev/null | tee "$out/profile_sd3.md" | head -30
python3 -m bench.profile_step --model lumina --ratio 0.25 2>/dev/null | tee "$out/profile_lumina.md" | head -30
