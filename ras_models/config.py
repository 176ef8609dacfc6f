"""RAS settings and the per-step schedule (which steps are dense, how many tokens each RAS step computes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ras_kernels.select.ops import METRICS, MODES  # select_regions owns the rule's choices

SCHEDULES = ("static", "dynamic")
KV_CACHES = (None, "fp8")
REUSES = ("copy", "linear")


def require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` is an int (bool is not), a ValueError unless it lies in
    [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {accepted}, got {value}")


def _require_float(name: str, value: object, accepted: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"RASConfig.{name} must be {accepted}, got {value!r}")


@dataclass(frozen=True)
class RASConfig:
    """Region-Adaptive Sampling settings for one generation of ``num_steps`` denoising steps.

    Steps ``0 .. warmup_steps-1``, every step in ``reset_steps`` and every step after ``end_step`` are dense (all
    image tokens); every other step is a RAS step that recomputes K tokens chosen from the previous step's output.

    Attributes:
        sample_ratio: share of image tokens a static RAS step computes, in (0, 1]; K = N - int((1 - ratio) * N).
        num_steps: denoising steps of a generation (the pipeline's ``num_inference_steps``).
        warmup_steps: dense steps at the start, in [1, num_steps - 1].
        reset_steps: 0-based dense "error reset" steps, each in [0, num_steps - 1].
        end_step: last step that may be a RAS step (default: the last step).
        schedule: ``"static"`` (same K every RAS step) or ``"dynamic"`` (K falls over the run in groups of
            ``dynamic_group`` steps by ``dynamic_step`` tokens a group, the drop count floored to a multiple of
            ``dynamic_multiple``).
        metric: per-pixel score over channels, ``"std"`` or ``"l2"``; or ``"random"``: a uniform pseudo-random
            score per token, drawn afresh at every RAS step (the starvation priority and the band apply unchanged);
            or ``"delta"``: each token's change since the previous step's guided output (channel L2 norm of the
            difference, mean over the patch), a token that step did not recompute keeping its last observed change;
            or ``"attention"``: each token's attention log-sum-exp over all keys, mean over heads, summed over every
            self-attention layer and transformer call (CFG calls, a prompt's batch rows) of the step, a token that
            step did not recompute keeping its last score (under context parallelism each rank sums its heads and the
            ranks' sums are added once per step).
        mode: ``"reference"`` (priority R * exp(+k D), the public code's rule) or ``"paper"`` (R * exp(-k D)).
        starvation_scale: k >= 0.
        high_ratio: share in (0, 1] of the dropped tokens taken from the highest priorities.
        shards: P >= 1: the image tokens form P consecutive runs of N / P, and every RAS step keeps the same count
            of each run's own tokens (``select_regions(..., shards=P)``; the counts above apply per run), the choice
            P ranks of a sequence-parallel run make; with 1, one selection over all N tokens.
        seed: int in [0, 2**31 - 1], used only with metric ``"random"``: each generation starts its draws from it
            (the session's seed tensor holds ``seed * 2**32`` and advances by 1 per selection, so a generation is
            reproducible and two seeds never share a draw); a nonzero seed with another metric is a ValueError.
        kv_cache: ``None`` (the K/V caches in the model's dtype) or ``"fp8"``: e4m3 values with an fp32 scale per
            (token, head), half the cache memory of bf16 (``cached_kv_attention``'s fp8 caches; CUDA compute
            capability >= 8.9, a head dim the attention kernel runs).
        reuse: what a token left out of a RAS step outputs: ``"copy"`` (its cached output, the RAS rule) or
            ``"linear"`` (a first-order forecast: its last two computed outputs, at steps s1 < s2, extrapolated
            along the step index to the current step s, v2 + (v2 - v1) (s - s2) / (s2 - s1); a copy while it has
            been computed only once in the generation). ``"linear"`` keeps the previous output, two step stamps and
            a result buffer per token beside the output cache. Measured in docs/quality.md: far worse than the
            copy under strong classifier-free guidance (each call's forecast diverges and the guidance scale
            amplifies it), level with it at guidance 2.
    """

    sample_ratio: float = 0.5
    num_steps: int = 28
    warmup_steps: int = 4
    reset_steps: tuple[int, ...] = (12, 20)
    end_step: int | None = None
    schedule: str = "static"
    dynamic_step: int = 256
    dynamic_group: int = 4
    dynamic_multiple: int = 64
    metric: str = "std"
    mode: str = "reference"
    starvation_scale: float = 0.1
    high_ratio: float = 1.0
    shards: int = 1
    seed: int = 0
    kv_cache: str | None = None
    reuse: str = "copy"

    def __post_init__(self) -> None:
        _require_float("sample_ratio", self.sample_ratio, "a float in (0, 1]", lambda v: 0 < v <= 1)
        require_int("RASConfig.num_steps", self.num_steps, 2)
        require_int("RASConfig.warmup_steps", self.warmup_steps, 1, self.num_steps - 1)
        if isinstance(self.reset_steps, (str, bytes)) or not hasattr(self.reset_steps, "__iter__"):
            raise TypeError(f"RASConfig.reset_steps must be a tuple of ints, got {self.reset_steps!r}")
        object.__setattr__(self, "reset_steps", tuple(self.reset_steps))
        for step in self.reset_steps:
            require_int("RASConfig.reset_steps[...]", step, 0, self.num_steps - 1)
        if self.end_step is not None:
            require_int("RASConfig.end_step", self.end_step, self.warmup_steps, self.num_steps - 1)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"RASConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        require_int("RASConfig.dynamic_step", self.dynamic_step, 0)
        require_int("RASConfig.dynamic_group", self.dynamic_group, 1)
        require_int("RASConfig.dynamic_multiple", self.dynamic_multiple, 1)
        if self.metric not in METRICS:
            raise ValueError(f"RASConfig.metric must be one of {METRICS}, got {self.metric!r}")
        if self.mode not in MODES:
            raise ValueError(f"RASConfig.mode must be one of {MODES}, got {self.mode!r}")
        _require_float("starvation_scale", self.starvation_scale, "a finite float >= 0", lambda v: v >= 0)
        _require_float("high_ratio", self.high_ratio, "a float in (0, 1]", lambda v: 0 < v <= 1)
        require_int("RASConfig.shards", self.shards, 1)
        require_int("RASConfig.seed", self.seed, 0, 2**31 - 1)
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"RASConfig.kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.reuse not in REUSES:
            raise ValueError(f"RASConfig.reuse must be one of {REUSES}, got {self.reuse!r}")
        if self.seed and self.metric != "random":
            raise ValueError(
                f"RASConfig.seed is used by metric='random' only; got seed={self.seed} with {self.metric!r}"
            )

    # Presets: the public reference examples' schedules; the SD3 sample ratio is the quality study's
    # recommendation (docs/quality.md).
    @classmethod
    def sd3(cls, **overrides) -> RASConfig:
        """Stable Diffusion 3: 28 steps, 4 warm-up, resets at 12 and 20, high_ratio 0.3, static (the public
        example's schedule), sample_ratio 0.25 (docs/quality.md: task scores within one standard error of dense
        down to 0.125 on the study's trained model; 0.25 is the ratio recommended there)."""
        base = cls(sample_ratio=0.25, num_steps=28, warmup_steps=4, reset_steps=(12, 20), high_ratio=0.3)
        return replace(base, **overrides)

    @classmethod
    def flux(cls, **overrides) -> RASConfig:
        """Flux.1: 28 steps, 4 warm-up, resets at 12 and 20, static sample_ratio 0.25 (SD3's reference schedule),
        ``metric="attention"``: on the Flux-architecture quality model (docs/quality.md, issue 14) it lands closest
        to dense of every rule at 0.25 and 0.125 (35.6 dB PSNR against random's 33.3 / 31.4 and std's 29.8), with
        a detail error at dense's level, and on the Flux.1-dev layout it runs within 1% of the random rule on the
        same kernel (docs/benchmarks.md, session 16; 3-4% behind random on cuDNN, which returns no log-sum-exp).
        ``metric="random"`` is the fastest rule, ``metric="std"`` the public code's."""
        base = cls(sample_ratio=0.25, num_steps=28, warmup_steps=4, reset_steps=(12, 20), metric="attention")
        return replace(base, **overrides)

    @classmethod
    def wan(cls, **overrides) -> RASConfig:
        """Wan 2.1 / 2.2 video: 50 steps (WanPipeline's default), 7 warm-up, resets at 21 and 36, static
        sample_ratio 0.25. This is the reference schedule (4 warm-up steps, resets at 12 and 20 of 28) moved to 50
        steps in proportion: a flow-matching sampler's steps split the same trajectory into more, smaller pieces, so
        the dense steps stay at the same points of it (warm-up over its first 1/7, the resets after 3/7 and 5/7) and
        the error that RAS steps accumulate between two resets spans the same stretch of it (the proportional
        values are 7.1, 21.4 and 35.7, rounded). Dense steps are then 9 of 50 (18%, the reference 6 of 28: 21%); on
        Wan 2.2 A14B the second expert's first step is dense too. The metric stays std: on the Wan-architecture quality
        model (docs/quality.md, issue 14) ``metric="attention"`` is ahead by 0.8 / 1.1 dB PSNR at 0.25 / 0.125 with
        less background flicker, but it needs the attention kernel's log-sum-exp, which cuDNN does not return, and
        on the Wan 2.1 1.3B layout std on cuDNN generates 9% faster (docs/benchmarks.md, session 16); random raises
        PSNR and flicker alike."""
        base = cls(sample_ratio=0.25, num_steps=50, warmup_steps=7, reset_steps=(21, 36))
        return replace(base, **overrides)

    @classmethod
    def lumina_next(cls, **overrides) -> RASConfig:
        """Lumina-Next example: 30 steps, 4 warm-up, resets at 12 and 22, dynamic 256 tokens per 4 steps."""
        base = cls(num_steps=30, warmup_steps=4, reset_steps=(12, 22), schedule="dynamic", high_ratio=1.0)
        return replace(base, **overrides)

    @property
    def last_ras_step(self) -> int:
        return self.num_steps - 1 if self.end_step is None else self.end_step

    def is_ras_step(self, step: int) -> bool:
        """Whether 0-based ``step`` recomputes only a subset of the image tokens."""
        return self.warmup_steps <= step <= self.last_ras_step and step not in self.reset_steps

    def active_tokens(self, step: int, num_tokens: int) -> int:
        """Image tokens computed at ``step`` (``num_tokens`` on a dense step)."""
        if not self.is_ras_step(step):
            return num_tokens
        if self.shards > 1:
            if num_tokens % self.shards:
                raise ValueError(f"RASConfig.shards={self.shards} must divide the image's token count N={num_tokens}")
            return self.shards * replace(self, shards=1).active_tokens(step, num_tokens // self.shards)
        skip = int((1.0 - self.sample_ratio) * num_tokens)
        if self.schedule == "dynamic":
            centre = ((self.num_steps + self.warmup_steps) // self.dynamic_group) // 2
            skip += self.dynamic_step * (step // self.dynamic_group - centre)
            skip = min(max(skip // self.dynamic_multiple * self.dynamic_multiple, 0), num_tokens)
        active = num_tokens - skip
        if active < 1:
            raise ValueError(
                f"RASConfig leaves no token active at step {step} of an image with {num_tokens} tokens; "
                "raise sample_ratio (or lower dynamic_step)"
            )
        return active

    def token_schedule(self, num_tokens: int) -> list[int]:
        """Active image tokens of every step; raises ValueError if any step would compute none."""
        return [self.active_tokens(step, num_tokens) for step in range(self.num_steps)]
