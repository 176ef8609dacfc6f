"""Region-Adaptive Sampling for diffusers pipelines and custom DiTs.

``apply_ras(pipe_or_transformer, config)`` patches one model instance (and its pipeline's scheduler) and returns
a handle whose ``remove()`` restores it; ``RASSession`` is the model-agnostic controller behind it.
"""

from __future__ import annotations

from .config import RASConfig
from .handle import RASHandle, hook_scheduler
from .session import RASSession

__all__ = ["RASConfig", "RASHandle", "RASSession", "apply_ras", "supported_models"]


def _adapters():
    try:
        from diffusers import LuminaNextDiT2DModel, SD3Transformer2DModel

        from .lumina import patch_lumina
        from .sd3 import patch_sd3
    except ImportError as err:
        raise ImportError(
            "apply_ras needs diffusers and einops: pip install 'ras-kernels[models]' (ras_kernels alone needs neither)"
        ) from err

    # transformer class -> (patch function, default config)
    return {
        SD3Transformer2DModel: (patch_sd3, RASConfig.sd3),
        LuminaNextDiT2DModel: (patch_lumina, RASConfig.lumina_next),
    }


def supported_models() -> list[str]:
    """Names of the transformer classes ``apply_ras`` accepts (directly or inside a pipeline)."""
    return [cls.__name__ for cls in _adapters()]


def apply_ras(target, config: RASConfig | None = None, *, cuda_graphs: bool = True) -> RASHandle:
    """Apply RAS to a diffusers pipeline (its ``.transformer`` and ``.scheduler``) or to a bare transformer.

    With a pipeline, each call of the pipeline is one generation: its scheduler's ``set_timesteps`` starts it
    (and raises ValueError if the call's step count differs from ``config.num_steps``), and the guided output
    handed to ``scheduler.step`` chooses the next step's tokens. With a bare transformer, call
    ``handle.observe(guided)`` after every step and ``handle.reset()`` before every generation.

    Args:
        target: ``StableDiffusion3Pipeline``/``SD3Transformer2DModel`` or ``LuminaPipeline``/``LuminaNextDiT2DModel``
            (any pipeline whose ``transformer`` is one of these).
        config: the settings; default: the model family's preset (``RASConfig.sd3()`` / ``RASConfig.lumina_next()``).
        cuda_graphs: capture each distinct step shape of a CUDA, no-grad run in a CUDA graph and replay it (removes
            the launch and host overhead that dominates low-ratio steps); the caches are then reused across
            generations and freed by ``remove()``. ``False`` runs every step eagerly.

    Returns:
        A :class:`RASHandle`; ``handle.remove()`` (or leaving ``with``) restores the exact original modules.
    """
    transformer = getattr(target, "transformer", target)
    adapters = _adapters()
    entry = adapters.get(type(transformer))
    if entry is None:
        raise TypeError(
            f"apply_ras does not support {type(target).__name__}; supported transformers: "
            f"{', '.join(supported_models())}, or a diffusers pipeline holding one as .transformer"
        )
    patch, preset = entry
    if config is None:
        config = preset()
    if getattr(transformer, "_ras_handle", None) is not None:
        raise RuntimeError("RAS is already applied to this transformer; call remove() on its handle first")
    handle = RASHandle(RASSession(config, patch_size=transformer.config.patch_size), cuda_graphs=cuda_graphs)
    try:
        patch(handle, transformer)
        if transformer is not target:
            hook_scheduler(handle, target.scheduler)
        handle.patch(transformer, "_ras_handle", handle)
    except Exception:
        handle.remove()
        raise
    return handle
