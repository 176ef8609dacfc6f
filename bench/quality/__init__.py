"""RAS quality study: small SD3-, Flux- and Wan-architecture DiTs trained on procedurally generated, captioned scenes
and clips.

* ``data``: the scene generator (coloured shapes with positions, sizes and textures over textured backgrounds; the
  ``detail`` style: small finely striped objects over smooth skies and walls; the ``video`` style: clips of such
  objects moving over a static background), its captions, the caption tokenizer and the classifier targets.
  Everything is generated in torch, vectorised.
* ``model``: the ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` configurations (pixel space, 64x64, 1024
  tokens of 2x2 pixels) and the ``WanTransformer3DModel`` one (8 x 32 x 32 clips, 2048 tokens), the caption
  encoder, the scene classifier, and saving/loading of the weights.
* ``train``: rectified-flow training of the DiT (with its caption encoder) and training of the classifier.
* ``evaluate``: dense vs RAS variants from the same seeds: PSNR, SSIM, task score, speedup; writes
  ``docs/quality.md`` and ``docs/quality_grid.png``; for Flux weights the frontier (``frontier``): RAS vs fewer
  dense steps vs diffusers' caches, per-object errors, ``docs/frontier.{md,json,png}``; for Wan weights the same
  frontier through ``WanPipeline`` with video errors (trajectory, flicker), ``docs/frontier-wan.{md,json,png}``.

GPU commands (from the repository root)::

    python -m bench.quality.train --out bench/quality/weights
    python -m bench.quality.evaluate --weights bench/quality/weights --samples 256
    python -m bench.quality.train --arch flux                                  # -> bench/quality/weights-flux
    python -m bench.quality.evaluate --weights bench/quality/weights-flux --samples 512
    python -m bench.quality.train --arch wan                                   # -> bench/quality/weights-wan
    python -m bench.quality.evaluate --weights bench/quality/weights-wan --samples 256
"""
