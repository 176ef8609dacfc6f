"""Region-Adaptive Sampling for diffusers pipelines and custom DiTs.

``apply_ras(pipe_or_transformer, config)`` patches one model instance (and its pipeline) and returns a handle
whose ``remove()`` restores it; ``RASSession`` is the model-agnostic controller behind it. A model family is a
``ModelAdapter`` declaring where RAS touches the model (``ras_models.adapter``); ``register_adapter`` adds one.
"""

from __future__ import annotations

import torch

from .adapter import (
    Attention,
    ModelAdapter,
    RASProcessor,
    find_adapter,
    install,
    refuse_submodule_hooks,
    register_adapter,
    registry,
)
from .config import RASConfig
from .handle import RASHandle
from .session import RASSession

__all__ = [
    "Attention",
    "ModelAdapter",
    "RASConfig",
    "RASHandle",
    "RASProcessor",
    "RASSession",
    "apply_ras",
    "register_adapter",
    "supported_models",
]


def supported_models() -> list[str]:
    """Names of the transformer classes ``apply_ras`` accepts (directly or inside a pipeline)."""
    return [cls.__name__ for cls in registry()]


def apply_ras(target, config: RASConfig | None = None, *, cuda_graphs: bool = True, max_shapes: int = 4) -> RASHandle:
    """Apply RAS to a diffusers pipeline (its ``.transformer``, and its scheduler during each call) or to a bare
    transformer.

    With a pipeline, each call of the pipeline is one generation: its scheduler's ``set_timesteps`` starts it
    (and raises ValueError if the call's step count differs from ``config.num_steps``), and the guided output
    handed to ``scheduler.step`` chooses the next step's tokens. The scheduler is hooked only while the pipeline
    runs, so pipelines may share one. A call that raises (or is interrupted, or stops early) frees the
    generation's caches and graphs at once. With a bare transformer, call ``handle.observe(guided)`` after every
    step and ``handle.reset()`` before every generation.

    ``pipe.enable_model_cpu_offload()`` composes, before or after ``apply_ras``. Accelerate hooks on the
    transformer's submodules (``enable_sequential_cpu_offload``, a ``device_map``) are refused. Replacing a patched
    attribute later (``set_attn_processor``, ``fuse_qkv_projections``, ...) makes the next call raise. diffusers'
    Ulysses context parallelism (``transformer.enable_parallelism``) composes on Flux and Wan, before or after
    ``apply_ras``, with ``RASConfig(shards=P)`` for degree P (docs/parallel.md); other parallelism raises ValueError.

    Args:
        target: ``StableDiffusion3Pipeline``/``SD3Transformer2DModel``, ``LuminaPipeline``/``LuminaNextDiT2DModel``,
            ``FluxPipeline``/``FluxTransformer2DModel`` or ``WanPipeline``/``WanImageToVideoPipeline``/
            ``WanTransformer3DModel`` (any pipeline whose ``transformer`` is one of these; a Wan 2.2 pipeline's
            ``transformer_2`` is patched too, and restored by the same ``remove()``), or a transformer class
            registered with :func:`register_adapter` (or a pipeline holding one).
        config: the settings; default: the model family's preset (``RASConfig.sd3()`` / ``RASConfig.lumina_next()`` /
            ``RASConfig.flux()`` / ``RASConfig.wan()``; a registered adapter's ``preset``).
        cuda_graphs: capture each distinct step shape of a CUDA, no-grad run in a CUDA graph and replay it (removes
            the launch and host overhead that dominates low-ratio steps); the caches are then reused across
            generations and freed by ``remove()``. ``False`` runs every step eagerly and frees the caches when each
            generation ends.
        max_shapes: with ``cuda_graphs``, the graphs and caches of at most this many generation shapes (batch,
            resolution) are held; a generation at a new shape first frees the least recently used one's.

    Returns:
        A :class:`RASHandle`; ``handle.remove()`` (or leaving ``with``) restores the exact original objects.
    """
    transformer = getattr(target, "transformer", target)
    if isinstance(transformer, torch.nn.Module) and hasattr(transformer, "_orig_mod"):
        raise TypeError(
            f"apply_ras got a torch.compile wrapper ({type(transformer).__name__}); apply RAS to the module itself "
            "(pipe.transformer = pipe.transformer._orig_mod) and compile it in place with transformer.compile(), "
            "before or after apply_ras"
        )
    adapter = find_adapter(transformer)
    if adapter is None:
        raise TypeError(
            f"apply_ras does not support {type(target).__name__}; supported transformers: "
            f"{', '.join(supported_models())}, or a diffusers pipeline holding one as .transformer "
            "(other families: ras_models.register_adapter)"
        )
    if config is None:
        config = adapter.preset()
    if getattr(transformer, "_ras_handle", None) is not None:
        raise RuntimeError("RAS is already applied to this transformer; call remove() on its handle first")
    if transformer is not target and not hasattr(target, "scheduler"):
        raise TypeError(f"apply_ras needs a pipeline with a .scheduler; {type(target).__name__} has none")
    refuse_submodule_hooks(transformer)
    session = RASSession(config, patch_size=adapter.patch_size(transformer), max_shapes=max_shapes)
    handle = RASHandle(session, transformer, cuda_graphs=cuda_graphs, context_parallel=adapter.context_parallel)
    try:
        install(adapter(handle, transformer))
        if transformer is not target:
            handle.hook_pipeline(target)
        handle.patch(transformer, "_ras_handle", handle)
    except Exception:
        handle.remove()
        raise
    return handle
