"""The RAS controller: per-generation state any DiT codebase can drive with five calls.

A generation of T steps, from the model's side::

    session.reset()                                   # new generation
    for step in range(T):
        session.begin_step(batch, height, width)      # before the transformer runs
        x = session.gather(patch_embed(latents))      # [B, N, D] -> [B, K, D] (no-op on dense steps)
        ...   per layer: out = session.attend(layer_key, q, k, v, k_extra=..., v_extra=...)
        out = session.scatter_output(final_proj(x))   # [B, K, F] -> [B, N, F] with cached rows for the others
        guided = cfg(unpatchify(out))                 # whatever the sampler does
        session.observe(guided)                       # picks the next step's active tokens

Shapes: B is the transformer batch, P prompts with B a multiple of P (CFG copies of a prompt share its active
set: row r of the batch belongs to prompt r % P, as diffusers' ``torch.cat([x] * 2)`` lays them out);
N = (H / p) * (W / p) image tokens in row-major patch order; K the step's active count.
"""

from __future__ import annotations

import torch

from ras_kernels import cached_kv_attention, gather_tokens, scatter_tokens, select_regions

from .config import RASConfig


class RASSession:
    """Schedule, K/V caches, per-token output cache, starvation counters and active set of one generation."""

    def __init__(self, config: RASConfig, patch_size: int, *, keep_buffers: bool = False):
        if not isinstance(config, RASConfig):
            raise TypeError(f"config must be a RASConfig, got {type(config).__name__}")
        self.config = config
        self.patch_size = patch_size
        self.keep_buffers = keep_buffers
        self.counters: torch.Tensor | None = None
        self.release()
        self.reset()

    def reset(self) -> None:
        """Start a new generation: step 0, zero starvation counters. Cache buffers are kept (and reused) when
        ``keep_buffers`` is set, as CUDA graphs need; otherwise they are released."""
        self.step = 0
        self.num_tokens: int | None = None
        self.schedule: list[int] | None = None
        self.active: torch.Tensor | None = None  # [P, K] for the current step, None when dense
        self.batch_index: torch.Tensor | None = None  # [B, N or K] rows this forward computes
        self._forward_done = False
        if self.counters is not None:
            self.counters.zero_()
        if not self.keep_buffers:
            self.release()

    def release(self) -> None:
        """Free every cache and index buffer."""
        self.counters = None
        self._kv: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        self._out: dict[tuple, torch.Tensor] = {}
        self._index: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def is_dense(self) -> bool:
        """Whether the current step computes every image token."""
        return self.active is None

    @property
    def num_active(self) -> int:
        return self.batch_index.shape[1]

    # ---- inside the transformer ----
    def begin_step(self, batch: int, height: int, width: int, device: torch.device) -> None:
        """Prepare the current step for a transformer batch of latents [batch, C, height, width]."""
        cfg, p = self.config, self.patch_size
        if self._forward_done:
            raise RuntimeError(
                f"the transformer ran twice at step {self.step} without observe() between: call observe(guided) "
                "after each step (apply_ras on a pipeline does this through its scheduler)"
            )
        if self.step >= cfg.num_steps:
            raise RuntimeError(
                f"step {self.step} is past the configured num_steps={cfg.num_steps}; call reset() to start a new "
                "generation"
            )
        if height % p or width % p:
            raise ValueError(f"latent height and width ({height}, {width}) must be divisible by patch size {p}")
        n = (height // p) * (width // p)
        if self.num_tokens is None:
            self.num_tokens, self.schedule = n, cfg.token_schedule(n)
        elif n != self.num_tokens:
            raise ValueError(f"latent size changed within a generation ({self.num_tokens} -> {n} tokens)")
        k = n if self.active is None else self.active.shape[1]
        index = self._index.get((batch, k))
        if index is None:
            index = torch.arange(k, device=device).repeat(batch, 1)  # the dense rows; RAS steps overwrite it
            self._index[(batch, k)] = index
        if self.active is not None:
            prompts = self.active.shape[0]
            if batch % prompts:
                raise ValueError(f"transformer batch {batch} is not a multiple of the {prompts} prompts observed")
            # In place: a captured step graph reads this buffer.
            index.view(batch // prompts, prompts, k).copy_(self.active.expand(batch // prompts, prompts, k))
        self.batch_index = index
        self._forward_done = True

    def gather(self, x: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
        """The step's rows of ``x`` [B, N, D] plus the same rows of ``add`` [1 or B, N, D] (summed in fp32), in one
        pass; [B, K, D]. On a dense step every row is gathered, which also yields a contiguous result."""
        return gather_tokens(x, self.batch_index, add=add)

    def gather_rows(self, table: torch.Tensor) -> torch.Tensor:
        """Active rows of a per-token table [1 or B, N, ...] shared by the layers (e.g. complex RoPE frequencies);
        the table itself on a dense step (it broadcasts)."""
        if self.is_dense:
            return table
        real = torch.view_as_real(table) if table.is_complex() else table
        rows = gather_tokens(real.reshape(*real.shape[:2], -1), self.batch_index)
        rows = rows.view(*rows.shape[:2], *real.shape[2:])
        return torch.view_as_complex(rows) if table.is_complex() else rows

    def attend(
        self,
        key: object,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        k_extra: torch.Tensor | None = None,
        v_extra: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention for layer ``key``: q [B, Lq, Hq, d] over the layer's whole-image K/V cache (refreshed with
        the step's k/v [B, K, Hkv, d]) followed by k_extra/v_extra [B, T, Hkv, d]. Returns [B, Lq, Hq, d]."""
        b, _, hkv, d = k.shape
        # Keyed by shape as well: a captured step graph keeps reading the buffers it was captured with.
        cache_key = (key, b, self.num_tokens, hkv, d, k.dtype)
        caches = self._kv.get(cache_key)
        if caches is None:
            if not self.is_dense:
                raise RuntimeError(
                    f"no K/V cache for layer {key!r} at RAS step {self.step}: a dense step must run first"
                )
            caches = tuple(torch.empty(b, self.num_tokens, hkv, d, dtype=k.dtype, device=k.device) for _ in "kv")
            self._kv[cache_key] = caches
        return cached_kv_attention(
            q, k, v, caches[0], caches[1], self.batch_index, k_extra=k_extra, v_extra=v_extra, scale=scale
        )

    def scatter_output(self, out: torch.Tensor) -> torch.Tensor:
        """Merge the step's per-token output [B, K, F] into the output cache; returns all N rows [B, N, F].

        The returned tensor is the cache itself: valid until the next step's scatter_output.
        """
        b, _, f = out.shape
        out_key = (b, self.num_tokens, f, out.dtype)
        cache = self._out.get(out_key)
        if cache is None:
            if not self.is_dense:
                raise RuntimeError(f"no output cache at RAS step {self.step}: a dense step must run first")
            cache = torch.empty(b, self.num_tokens, f, dtype=out.dtype, device=out.device)
            self._out[out_key] = cache
        scatter_tokens(cache, self.batch_index, out)
        return cache

    # ---- after the step ----
    def observe(self, guided: torch.Tensor) -> None:
        """Take the step's guided output [P, C, H, W] (inactive rows merged) and choose the next active set."""
        if not self._forward_done:
            raise RuntimeError(f"observe() at step {self.step} before the transformer ran for that step")
        cfg = self.config
        nxt = self.step + 1
        if nxt < cfg.num_steps and cfg.is_ras_step(nxt):
            prompts = guided.shape[0]
            if self.counters is None or self.counters.shape != (prompts, self.num_tokens):
                self.counters = torch.zeros(prompts, self.num_tokens, dtype=torch.int32, device=guided.device)
            self.active = select_regions(
                guided,
                self.schedule[nxt],
                patch_size=self.patch_size,
                metric=cfg.metric,
                counters=self.counters,
                starvation_scale=cfg.starvation_scale,
                mode=cfg.mode,
                high_ratio=cfg.high_ratio,
            )
        else:
            self.active = None
        self.step = nxt
        self._forward_done = False
        if nxt == cfg.num_steps and not self.keep_buffers:
            self.release()  # the generation is over: free the caches rather than keep them allocated

    def memory_bytes(self) -> int:
        """Bytes held by the K/V and output caches now."""
        tensors = [t for pair in self._kv.values() for t in pair] + list(self._out.values())
        return sum(t.numel() * t.element_size() for t in tensors)
