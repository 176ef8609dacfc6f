"""Where a RAS step spends its GPU time: torch.profiler over eager steps, kernels grouped by name (CUDA only).

    python -m bench.profile_step --model sd3 --ratio 0.25 [--top 25]

Builds the published layout with random weights (as bench.e2e does) and drives it with the benches' own sampling loop
(bench.pipelines.Loop: no pipeline host work in the profile), runs one generation to reach a RAS step, then profiles
a few eager RAS steps and a few dense steps and prints the kernels that take the most GPU time in each.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.pipelines import Loop, build_transformer, preset
from ras_models import apply_ras


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
    parser.add_argument("--model", choices=("sd3", "lumina"), default="sd3")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    transformer = build_transformer(args.model, True, device, dtype)
    loop = Loop(transformer, 128, seed=0)
    config = preset(args.model, None, args.ratio, 4096, "static")
    profiled = 3

    def window(prof, first: int):
        """Start ``prof`` before step ``first`` and stop it after ``profiled`` steps."""

        def on_step(i):
            if i == first:
                prof.start()
            elif i == first + profiled:
                torch.cuda.synchronize()
                prof.stop()

        return on_step

    with torch.no_grad():
        dense = profile(activities=[ProfilerActivity.CUDA])
        loop.run(profiled + 2, on_step=window(dense, 1))
        print(f"## {args.model} dense step (diffusers, eager)\n{_top(dense, args.top, profiled)}\n")
        with apply_ras(transformer, config, cuda_graphs=False) as handle:
            first = config.warmup_steps  # steps warmup .. warmup+2 are RAS steps in the presets
            loop.run(first + profiled + 1, handle)  # Triton's autotuner benchmarks its configs here, unprofiled
            ras = profile(activities=[ProfilerActivity.CUDA])
            loop.run(first + profiled + 1, handle, on_step=window(ras, first))
        print(f"## {args.model} RAS step, ratio {args.ratio} (eager)\n{_top(ras, args.top, profiled)}")


if __name__ == "__main__":
    main()
