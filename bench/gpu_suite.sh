#!/usr/bin/env bash
# The GPU suite: every test (the GPU-marked ones included), the kernel table, the pipeline end-to-end tables, the
# first-call and soak runs, profiles.
# Usage, from the repository root on a CUDA machine: bash bench/gpu_suite.sh OUTDIR [PART]
#   tests    the test suite and the kernel table (tests.log, kernels.md)   ~10 min on an H200: past one device call's
#            limit, so run `python -m pytest tests/test_[a-r]*.py` and `tests/test_[s-z]*.py` as two calls
#   e2e      1024^2, timed through pipe(...): SD3 and Lumina static at 1.0 / 0.5 / 0.25 / 0.125 + dense torch.compile,
#            Lumina dynamic at 0.5 (e2e.md, *.json), the plot of the static runs (speedup.png)       ~6-8 min
#            (e2e-sd3 ~3 min and e2e-lumina ~5 min run its two halves alone)
#   e2e-flux Flux.1-dev layout at 1024^2 through pipe(...): dense eager, dense torch.compile, diffusers' TaylorSeer at
#            intervals 3 and 5, RAS at 0.5 / 0.25 / 0.125 with the preset (metric attention) (e2e.md, flux-1024.json) ~5 min
#   e2e-wan  Wan 2.1 T2V 1.3B, 480x832, 81 frames, 50 steps: dense eager and RAS at 0.25 / 0.125 (e2e.md,
#            wan-1.3b.json); runs only when named                                                      ~6 min
#   e2e-wan14b      optional, Wan 2.1 14B and Wan 2.2 A14B (two 14B experts) at 480x832, 81 frames: 12 measured steps
#                   each and the 50-step estimates (--extrapolate-to 50, labelled as estimates)       ~9 min
#   e2e-wan14b-720  optional, Wan 2.1 14B at 720x1280, 81 frames (75,600 tokens), RAS 0.25 with fp8 K/V caches (bf16
#                   caches would take 115 GiB): 6 measured steps and the 50-step estimate                   ~7 min (est.)
#   e2e-ulysses     optional, two GPUs: Flux.1-dev at 2048^2 and Wan 2.1 14B (12 steps + 50-step estimates) under
#                   diffusers' Ulysses context parallelism, dense and RAS 0.25 (torchrun, docs/parallel.md)  ~8 min
#   e2e-choices-image  optional, the selection rules and attention paths against one dense eager baseline per
#                   model, through pipe(...): SD3 with RAS_ATTENTION triton / hopper, Flux.1-dev with metric random /
#                   attention and RAS_ATTENTION triton / cudnn, at 0.5 / 0.25 / 0.125 (sd3-1024-paths.json,
#                   flux-1024-choices.json)                                                                    ~3 min
#   e2e-choices-wan optional, the same for Wan 2.1 1.3B at 0.25 / 0.125: metric std / attention, RAS_ATTENTION
#                   triton / cudnn (wan-1.3b-choices.json)                                                   ~10 min
#   startup  bench.first_call (fresh processes, empty and warm Triton cache; first_call.md), then bench.soak
#            (100 SD3 generations over 6 shapes; soak.md, soak.csv)                                                 ~7-9 min
#            (first-call ~6-7 min and soak ~2 min run its two halves alone)
#   profile  bench.profile_step at ratios 0.5 / 0.25 / 0.125 for SD3, Lumina, Flux, Wan 1.3B (profile.md)  ~6 min
#   e2e2048-sd3     optional, SD3 at 2048^2 (2 timed calls per run, no own-loop column), appended to e2e.md  ~4 min
#   e2e2048-lumina  optional, Lumina at 2048^2: static at 10 steps (diffusers' dense step takes ~1.9 s), dynamic
#                   at 0.5 with 1 timed call; appended to e2e.md; then the plot of every static run found ~8 min
#   all      tests, e2e, startup, profile (default); run each part as its own device call (10-minute limit)
# Errors go to OUTDIR/stderr.log. The tests default to RAS_ATTN_AUTOTUNE=0 (tests/conftest.py); the benches
# autotune as users do.
set -uo pipefail
out=${1:-gpu-results}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
err="$out/stderr.log"
python3 -c "import torch, triton, diffusers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/versions.log"
# A part runs when named, or with "all" unless it is optional or a half of another part.
halves=" e2e-sd3 e2e-lumina e2e-flux e2e-wan first-call soak "
optional=" e2e2048-sd3 e2e2048-lumina e2e-wan14b e2e-wan14b-720 e2e-ulysses e2e-choices-image e2e-choices-wan "
want() { [ "$part" = "$1" ] || { [ "$part" = all ] && [[ "$optional" != *" $1 "* && "$halves" != *" $1 "* ]]; }; }
plot() {
  jsons=()
  for run in sd3-1024 sd3-2048 lumina-1024-static lumina-2048-static flux-1024; do
    [ -f "$out/$run.json" ] && jsons+=("$out/$run.json")
  done
  python3 -m bench.plot_e2e "${jsons[@]}" --out "$out/speedup.png" 2>>"$err"
}
e2e() { echo "### bench.e2e $*"; python3 -m bench.e2e "$@" 2>>"$err"; echo; }
if want tests; then
  python3 -m pytest -q -p no:cacheprovider --maxfail=20 --durations=10 tests 2>&1 \
    | tee -a "$out/tests.log" | tail -25
  python3 -m bench.kernels --markdown "$out/kernels.md" 2>>"$err" | tail -40
fi
if want e2e || want e2e-sd3; then
  e2e --model sd3 --ratio 1.0 0.5 0.25 0.125 --json "$out/sd3-1024.json" | tee -a "$out/e2e.md"
fi
if want e2e || want e2e-lumina; then
  {
    e2e --model lumina --schedule static --ratio 1.0 0.5 0.25 0.125 --json "$out/lumina-1024-static.json"
    e2e --model lumina --ratio 0.5 --no-compile-baseline --no-loop --json "$out/lumina-1024-dynamic.json"
  } | tee -a "$out/e2e.md"
fi
if want e2e || want e2e-flux; then
  e2e --model flux --ratio 0.5 0.25 0.125 --taylorseer 3 5 --json "$out/flux-1024.json" | tee -a "$out/e2e.md"
fi
wan_args="--model wan --frames 81 --ratio 0.25 0.125 --repeats 2 --no-compile-baseline"  # Wan 2.1 1.3B, 480x832
if want e2e-wan; then
  # shellcheck disable=SC2086 (the words of $wan_args are the options)
  e2e $wan_args --json "$out/wan-1.3b.json" | tee -a "$out/e2e.md"
fi
if want e2e || want e2e-sd3 || want e2e-lumina || want e2e-flux; then
  plot
fi
if want e2e-choices-image; then
  {
    e2e --model sd3 --ratio 0.5 0.25 0.125 --attention triton hopper --no-compile-baseline --no-loop \
      --json "$out/sd3-1024-paths.json"
    e2e --model flux --ratio 0.5 0.25 0.125 --metric random attention --attention triton cudnn --no-compile-baseline \
      --json "$out/flux-1024-choices.json"
  } | tee -a "$out/e2e.md"
fi
if want e2e-choices-wan; then
  # shellcheck disable=SC2086
  e2e $wan_args --metric std attention --attention triton cudnn --json "$out/wan-1.3b-choices.json" \
    | tee -a "$out/e2e.md"
fi
if want e2e-wan14b; then
  for model in wan-14b wan-a14b; do
    e2e --model $model --frames 81 --steps 12 --extrapolate-to 50 --ratio 0.25 0.125 --repeats 1 \
      --no-compile-baseline --json "$out/$model-12steps.json" | tee -a "$out/e2e.md"
  done
fi
if want e2e-wan14b-720; then
  e2e --model wan-14b --resolution 720x1280 --frames 81 --steps 6 --extrapolate-to 50 --ratio 0.25 --kv-cache fp8 \
    --repeats 1 --no-compile-baseline --json "$out/wan-14b-720p-6steps.json" | tee -a "$out/e2e.md"
fi
if want e2e-ulysses; then
  for args in "--model flux --resolution 2048" "--model wan-14b --frames 81 --steps 12 --extrapolate-to 50"; do
    echo "### torchrun --nproc-per-node 2 -m bench.e2e $args --ratio 0.25 --ulysses 2"
    # shellcheck disable=SC2086 (the words of $args are the options)
    torchrun --nproc-per-node 2 -m bench.e2e $args --ratio 0.25 --ulysses 2 2>>"$err"
    echo
  done | tee -a "$out/e2e.md"
fi
if want startup || want first-call; then
  python3 -m bench.first_call 2>>"$err" | tee "$out/first_call.md"
fi
if want startup || want soak; then
  # 3 resolutions x 2 batches = 6 shapes against apply_ras's default cap of 4: the LRU evicts as it cycles.
  python3 -m bench.soak --resolutions 512 768 1024 --csv "$out/soak.csv" 2>>"$err" | tee "$out/soak.md"
fi
if want profile; then
  for model in sd3 lumina flux wan; do
    for ratio in 0.5 0.25 0.125; do
      echo "# $model, ratio $ratio"
      python3 -m bench.profile_step --model $model --ratio $ratio --top 14
    done
  done 2>>"$err" > "$out/profile.md"
fi
if want e2e2048-sd3; then
  e2e --model sd3 --resolution 2048 --repeats 2 --no-loop --json "$out/sd3-2048.json" | tee -a "$out/e2e.md"
fi
if want e2e2048-lumina; then
  {
    e2e --model lumina --resolution 2048 --steps 10 --schedule static --repeats 2 --no-loop \
      --json "$out/lumina-2048-static.json"
    e2e --model lumina --resolution 2048 --ratio 0.5 --no-compile-baseline --repeats 1 --no-loop \
      --json "$out/lumina-2048-dynamic.json"
  } | tee -a "$out/e2e.md"
  plot
fi
