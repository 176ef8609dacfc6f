"""Where a RAS step spends its GPU time: torch.profiler over eager steps, kernels grouped by name (CUDA only).

    python -m bench.profile_step --model flux --ratio 0.25 [--top 25]
    python -m bench.profile_step --model wan --frames 81      # Wan 2.1 1.3B at 480x832 (wan-14b: the 14B layout)

Builds the published layout with random weights and its pipeline (as bench.e2e does), runs ``pipe(...)`` at 1024^2
(Wan: 480x832, ``--frames`` frames, CFG's two transformer calls in each step) and profiles a few of its steps through
``callback_on_step_end``: dense steps of the plain pipeline, then eager RAS steps (after one unprofiled generation, in
which Triton's autotuner benchmarks its configs), and prints the kernels that take the most GPU time in each.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.pipelines import (
    build_pipeline,
    build_transformer,
    family_of,
    generate,
    num_tokens,
    preset,
    prompt_inputs,
)
from ras_models import apply_ras

SIZE = 1024
VIDEO_SIZE = (480, 832)


def _top(prof, top: int, steps: int) -> str:
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [
        f"GPU time per step {total / steps / 1e3:.2f} ms over {len(events)} kernel names",
        "| share | ms/step | calls/step | kernel |",
        "|---|---|---|---|",
    ]
    for e in events[:top]:
        lines.append(
            f"| {100 * e.self_device_time_total / total:.1f}% | {e.self_device_time_total / steps / 1e3:.3f} | "
            f"{e.count / steps:.0f} | {e.key[:90]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd3", "lumina", "flux", "wan", "wan-14b"), default="sd3")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--frames", type=int, default=81, help="Wan: frames per video, 4k + 1 (default 81)")
    args = parser.parse_args(argv)
    pipe = build_pipeline(build_transformer(args.model, True, torch.device("cuda"), torch.bfloat16))
    video = args.model.startswith("wan")
    size, frames = (VIDEO_SIZE, args.frames) if video else (SIZE, None)
    inputs = prompt_inputs(pipe.transformer, 1, seed=0)
    config = preset(family_of(pipe.transformer), None, args.ratio, num_tokens(pipe, size, frames), "static")
    profiled = 3

    def run(first: int):
        """One generation, profiling steps ``first`` .. ``first + profiled - 1`` (``first`` >= 1), then skipping the
        rest (the pipelines' ``interrupt``: SD3, Flux and Wan; Lumina's pipeline has none and runs to the end)."""
        prof = profile(activities=[ProfilerActivity.CUDA])

        def on_step(pipe, i, timestep, tensors):
            if i == first - 1:
                prof.start()
            elif i == first + profiled - 1:
                torch.cuda.synchronize()
                prof.stop()
                pipe._interrupt = True
            return {}

        generate(pipe, inputs, steps=config.num_steps, size=size, seed=0, callback=on_step, frames=frames)
        return prof

    with torch.no_grad():
        dense = run(1)
        print(f"## {args.model} dense step (diffusers, eager)\n{_top(dense, args.top, profiled)}\n")
        with apply_ras(pipe, config, cuda_graphs=False):
            generate(pipe, inputs, steps=config.num_steps, size=size, seed=0, frames=frames)  # autotunes, unprofiled
            ras = run(config.warmup_steps)  # steps warmup .. warmup + 2 are RAS steps in the presets
        print(f"## {args.model} RAS step, ratio {args.ratio} (eager)\n{_top(ras, args.top, profiled)}")


if __name__ == "__main__":
    main()
