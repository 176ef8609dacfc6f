"""RAS quality study: a small SD3-architecture DiT trained on procedurally generated, captioned scenes.

* ``data``: the scene generator (coloured shapes with positions, sizes and textures over textured backgrounds),
  its captions, the caption tokenizer and the classifier targets. Everything is generated in torch, vectorised.
* ``model``: the ``SD3Transformer2DModel`` configuration (pixel space, 64x64, patch 2), the caption encoder, the
  scene classifier, and saving/loading of the shipped weights.
* ``train``: rectified-flow training of the DiT (with its caption encoder) and training of the classifier.
* ``evaluate``: dense vs RAS variants from the same seeds: PSNR, SSIM, task score, speedup; writes
  ``docs/quality.md`` and ``docs/quality_grid.png``.

GPU commands (from the repository root)::

    python -m bench.quality.train --out bench/quality/weights
    python -m bench.quality.evaluate --weights bench/quality/weights --samples 256
"""
