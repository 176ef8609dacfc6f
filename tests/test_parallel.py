"""diffusers' context parallelism (``transformer.enable_parallelism``), which RAS does not run under yet: refused with
a ValueError naming it, whether enabled before ``apply_ras`` or after it (at the next call), instead of each rank
running RAS's attention on its own shard of the tokens.

Two CPU processes with gloo and a real Ulysses split (diffusers maps each rank to an accelerator with
``rank % torch.accelerator.device_count()``, which is 0 on a CPU-only machine: the workers report one device).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REFUSED = "parallelism \\(enable_parallelism\\), which RAS does not support"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    from diffusers import ContextParallelConfig

    from ras_models import RASConfig, apply_ras

    from ._models import tiny_flux_pipeline

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.accelerator.device_count = lambda: 1
    try:
        config = RASConfig(num_steps=4, warmup_steps=1, reset_steps=(), sample_ratio=0.5)
        g = torch.Generator().manual_seed(0)
        prompts = {"prompt_embeds": torch.randn(1, 6, 24, generator=g), "pooled_prompt_embeds": torch.randn(1, 16)}
        parallel = ContextParallelConfig(ulysses_degree=2)

        def generate(pipe):
            with torch.no_grad():
                return pipe(**prompts, height=128, width=128, num_inference_steps=4, output_type="latent").images

        before = tiny_flux_pipeline()  # enabled, then apply_ras
        before.set_progress_bar_config(disable=True)
        before.transformer.enable_parallelism(config=parallel)
        generate(before)  # the split runs (both ranks take part)
        with pytest.raises(ValueError, match=REFUSED):
            apply_ras(before, config)
        assert not hasattr(before.transformer, "_ras_handle")  # refused before any patch

        after = tiny_flux_pipeline()  # apply_ras, then enabled
        after.set_progress_bar_config(disable=True)
        handle = apply_ras(after, config)
        after.transformer.enable_parallelism(config=parallel)
        with pytest.raises(ValueError, match=REFUSED):
            generate(after)
        handle.remove()
    finally:
        dist.destroy_process_group()


def test_context_parallelism_is_refused_before_and_after_apply():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2)
