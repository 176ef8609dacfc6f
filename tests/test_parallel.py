"""RAS under diffusers' Ulysses context parallelism (``transformer.enable_parallelism``), on two CPU processes with
gloo and a real split: Flux and Wan run (enabled before or after ``apply_ras``) and match the one-process run with
the same per-shard selection, with half the cache memory per rank; what RAS cannot run is refused with a ValueError
naming it, whether enabled before ``apply_ras`` or after it (at the next call).

diffusers maps each rank to an accelerator with ``rank % torch.accelerator.device_count()``, which is 0 on a
CPU-only machine: the workers report one device.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig

from ras_models import RASConfig
from ras_models.handle import _sharding

UNSUPPORTED = "parallelism \\(enable_parallelism\\), which RAS does not support for this model"
CONFIG = {"num_steps": 4, "warmup_steps": 1, "reset_steps": (), "sample_ratio": 0.5}  # step 0 dense, 1-3 RAS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(pipe, memory: list[int] | None = None) -> torch.Tensor:
    """Latents of a 4-step generation, the same inputs on every rank: Flux 128x128 (8x8 tokens, 6 text tokens); Wan
    9 frames of 64x96 (3x4x6 tokens) with CFG (two calls per step). With ``memory``, the RAS caches' bytes after each
    step but the last (the last one frees them) are appended to it."""
    g = torch.Generator().manual_seed(0)
    if type(pipe).__name__ == "FluxPipeline":
        inputs = {"prompt_embeds": torch.randn(1, 6, 24, generator=g), "pooled_prompt_embeds": torch.randn(1, 16)}
        inputs |= {"height": 128, "width": 128}
    else:
        inputs = {"prompt_embeds": torch.randn(1, 8, 16, generator=g), "guidance_scale": 5.0}
        inputs |= {"negative_prompt_embeds": torch.randn(1, 8, 16, generator=g), "num_frames": 9}
        inputs |= {"height": 64, "width": 96}

    def measure(pipe, step, timestep, kwargs):
        if memory is not None and step < 3:
            memory.append(pipe.transformer._ras_handle.session.memory_bytes())
        return {}

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = pipe(**inputs, num_inference_steps=4, output_type="latent", generator=generator,
                   callback_on_step_end=measure)  # fmt: skip
    return out[0]


def _pipeline(family: str):
    from ._models import tiny_flux_pipeline, tiny_wan_pipeline

    torch.manual_seed(0)  # the same weights in every process and run
    pipe = tiny_flux_pipeline() if family == "flux" else tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _worker(rank: int, port: int) -> None:
    from ras_models import RASConfig, apply_ras

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.accelerator.device_count = lambda: 1
    try:
        parallel = ContextParallelConfig(ulysses_degree=2)
        # Metric attention: each rank's log-sum-exps cover its H / 2 heads and its queries interleave the ranks'
        # text and image rows (Flux: 3 text tokens per rank).
        for family, metric in (("flux", "std"), ("wan", "std"), ("flux", "attention"), ("wan", "attention")):
            config = RASConfig(**CONFIG, shards=2, metric=metric)
            single = _pipeline(family)  # one process, no parallelism: the reference
            single_memory: list[int] = []
            with apply_ras(single, config, cuda_graphs=False):
                expected = _generate(single, single_memory)
            assert (_generate(single) - expected).abs().max() > 1e-3  # the RAS steps did change the result

            before = _pipeline(family)  # enabled, then apply_ras: RAS's patches go beneath diffusers' hooks
            before.transformer.enable_parallelism(config=parallel)
            memory: list[int] = []
            with apply_ras(before, config, cuda_graphs=False):
                got = _generate(before, memory)
            after = _pipeline(family)  # apply_ras, then enabled: diffusers' hooks wrap RAS's patches
            handle = apply_ras(after, config, cuda_graphs=False)
            after.transformer.enable_parallelism(config=parallel)
            got_after = _generate(after)
            handle.remove()
            for name, latents in (("before", got), ("after", got_after)):
                diff = (latents - expected).abs().max().item()
                print(f"{family} {metric} rank {rank} enabled {name} apply_ras: max |2 ranks - 1 process| = {diff:.3g}")
                torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
            print(f"{family} {metric} rank {rank}: RAS bytes per rank {max(memory)}, one process {max(single_memory)}")
            if metric == "std":  # metric attention adds its per-token scores, whole on every rank (each selects)
                assert max(memory) / max(single_memory) == 0.5

        with pytest.raises(ValueError, match="set RASConfig\\(shards=2\\)"):
            apply_ras(before, RASConfig(**CONFIG))
        assert not hasattr(before.transformer, "_ras_handle")  # refused before any patch
        mismatched = _pipeline("flux")
        handle = apply_ras(mismatched, RASConfig(**CONFIG))
        mismatched.transformer.enable_parallelism(config=parallel)
        with pytest.raises(ValueError, match="set RASConfig\\(shards=2\\)"):
            _generate(mismatched)
        handle.remove()
    finally:
        dist.destroy_process_group()


def _bench_worker(rank: int, port: int, out: str) -> None:
    import contextlib
    import io

    from bench import e2e
    from ras_models import apply_ras

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.accelerator.device_count = lambda: 1
    printed, handles = io.StringIO(), []

    def apply(*args, **kwargs):
        handles.append(apply_ras(*args, **kwargs))
        return handles[-1]

    e2e.apply_ras = apply
    try:
        with contextlib.redirect_stdout(printed):
            e2e.main(
                ["--model", "wan", "--no-full", "--device", "cpu", "--ulysses", "2", "--steps", "10", "--ratio", "0.5"]
                + ["--frames", "5", "--resolution", "32x48", "--repeats", "1"]
            )
    finally:
        dist.destroy_process_group()
    # RAS ran sharded: this rank's part of diffusers' Ulysses split, with per-shard selection.
    assert [(h.session.sharding.rank, h.session.sharding.size, h.session.config.shards) for h in handles] == [
        (rank, 2, 2)
    ]
    if rank == 0:
        with open(out, "w") as f:
            f.write(printed.getvalue())


def test_bench_e2e_under_ulysses(tmp_path):
    """``torchrun --nproc-per-node 2 -m bench.e2e --model wan --ulysses 2`` (here two spawned gloo processes): the
    dense pipeline and RAS with shards = 2 run under the same context parallelism; rank 0 prints the table."""
    out = tmp_path / "rank0.txt"
    mp.spawn(_bench_worker, args=(_free_port(), str(out)), nprocs=2)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split("|")[1].strip() for row in rows] == ["diffusers dense eager", "RAS ratio 0.5 (static, eager)"]
    tokens = float(rows[1].split("|")[2].strip().rstrip("%"))
    # 10 steps of the Wan preset: 8 dense steps of 12 tokens, 2 RAS steps of 6 (3 on each rank's shard of 6).
    assert tokens == pytest.approx(100 * (8 * 12 + 2 * 6) / (10 * 12), abs=0.05)


def test_ulysses_matches_one_process_and_refuses_what_it_cannot_run():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2)


def _model(parallel, heads: int = 4) -> SimpleNamespace:
    return SimpleNamespace(_parallel_config=parallel, config=SimpleNamespace(num_attention_heads=heads))


@pytest.mark.parametrize(
    "parallel, heads, shards, supported, match",
    [
        (ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2)), 4, 1, True, UNSUPPORTED),
        (ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)), 4, 2, False, UNSUPPORTED),
        (ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2)), 4, 2, True, "ring_degree=2"),
        (
            ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True)),
            4,
            2,
            True,
            "ulysses_anything=True",
        ),
        (ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)), 3, 2, True, "3 attention"),
        (ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)), 4, 4, True, "shards=2"),
    ],
    ids=["tensor-parallel", "unsupported-family", "ring", "ulysses-anything", "heads", "shards"],
)
def test_refused_parallelism(parallel, heads, shards, supported, match):
    with pytest.raises(ValueError, match=match):
        _sharding(_model(parallel, heads), RASConfig(shards=shards), supported)
