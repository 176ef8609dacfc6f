"""The RAS controller: per-generation state any DiT codebase can drive with five calls.

A generation of T steps, from the model's side::

    session.reset()                                   # new generation
    for step in range(T):
        session.begin_step(batch, height, width)      # before the transformer runs
        x = session.gather(patch_embed(latents))      # [B, N, D] -> [B, K, D] (no-op on dense steps)
        ...   per layer: out = session.attend(layer_key, q, k, v, k_extra=..., v_extra=..., image_queries=...)
        out = session.scatter_output(final_proj(x))   # [B, K, F] -> [B, N, F] with cached rows for the others
        guided = cfg(unpatchify(out))                 # whatever the sampler does
        session.observe(guided)                       # picks the next step's active tokens

Shapes: B is the transformer batch, P prompts with B a multiple of P (CFG copies of a prompt share its active
set: row r of the batch belongs to prompt r % P, as diffusers' ``torch.cat([x] * 2)`` lays them out);
N = (H / p) * (W / p) image tokens in row-major patch order; K the step's active count.

Under diffusers' Ulysses context parallelism of degree S (``sharding``, set by the handle from the model's
``enable_parallelism``; ``RASConfig.shards`` = S), rank r holds the r-th of S consecutive runs of N / S tokens and
keeps K / S of them (per-shard selection): ``gather`` / ``gather_rows`` / ``scatter_output`` work on its N / S rows
(``batch_index``: local indices [B, K / S]; ``gather`` / ``gather_rows`` also take all N rows, with the global
indices ``kv_index``, for a model whose plan splits the sequence after them, as Wan's does), and ``attend``
exchanges q/k/v for all K rows of H / S heads, caches the whole sequence of those heads (written at ``kv_index``)
and exchanges the output back. Every rank observes the same guided output, so all of them choose the same active
set.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch

from ras_kernels import cached_kv_attention, gather_tokens, scatter_tokens, select_regions
from ras_kernels._backend import FLOAT_DTYPES, check_tensor

from .config import RASConfig, require_int


def _require_size(name: str, value: object) -> None:
    if not isinstance(value, torch.SymInt):  # a size torch.compile traces symbolically is checked where it is real
        require_int(name, value, 1)


class Sharding(NamedTuple):
    """This rank's part of diffusers' Ulysses context parallelism: rank ``rank`` of ``size`` in ``group`` holds the
    ``rank``-th of ``size`` consecutive runs of the image tokens (``RASSession.sharding``)."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int


class RASSession:
    """Schedule, K/V caches, per-token output cache, starvation counters, active set (and metric delta's previous
    output and scores, metric attention's per-step sums and scores) of one generation.

    Args:
        config: the RAS settings.
        patch_size: p, the transformer's patch size (an int >= 1).
        keep_buffers: keep the caches and index buffers of a generation for the next one at the same shape (CUDA
            graphs read the buffers they were captured with); otherwise they are freed when a generation ends.
        max_shapes: with ``keep_buffers``, the buffers of at most this many generation shapes (batch, latent height,
            latent width, device) are held; a generation at a new shape first frees those of the least recently used
            one.
    """

    def __init__(self, config: RASConfig, patch_size: int, *, keep_buffers: bool = False, max_shapes: int = 4):
        if not isinstance(config, RASConfig):
            raise TypeError(f"config must be a RASConfig, got {type(config).__name__}")
        require_int("patch_size", patch_size, 1)
        if not isinstance(keep_buffers, bool):
            raise TypeError(f"keep_buffers must be a bool, got {type(keep_buffers).__name__}")
        require_int("max_shapes", max_shapes, 1)
        self.config = config
        self.patch_size = patch_size
        self.keep_buffers = keep_buffers
        self.max_shapes = max_shapes
        self.sharding: Sharding | None = None  # this rank's part of context parallelism (RASHandle sets it)
        self.counters: torch.Tensor | None = None
        self.seed: torch.Tensor | None = None
        self.release()
        self.reset()

    def reset(self) -> None:
        """Start a new generation: step 0, zero starvation counters. Cache buffers are kept (and reused) when
        ``keep_buffers`` is set, as CUDA graphs need; otherwise they are released."""
        self.step = 0
        self.num_tokens: int | None = None
        self.schedule: list[int] | None = None
        self.shape_key: tuple | None = None  # (batch, latent height, latent width, device) of this generation
        self.active: torch.Tensor | None = None  # [P, K] for the current step, None when dense
        self.batch_index: torch.Tensor | None = None  # [B, N or K] rows this forward computes (of this rank's shard)
        self.kv_index: torch.Tensor | None = None  # the same rows' indices in the whole sequence (K/V cache rows)
        self.call: object = None  # the transformer call now running (begin_step's ``call``)
        self.new_call = False  # whether that call runs for the first time in this generation
        self._calls: set = set()  # the calls begun in the current step
        self._seen: set = set()  # the calls begun in this generation
        # metric "random": the [1] int64 seed of select_regions, set to config.seed's stream at every generation's
        # start (so every generation draws the same sequence) and advanced by select_regions at each selection. It
        # is made once, at the first selection, and refilled in place after that: a new tensor would be a
        # host-to-device copy, a host sync in the middle of a generation.
        if self.seed is not None:
            self.seed.fill_(self.config.seed << 32)
        if self.counters is not None:
            self.counters.zero_()
        for sums in self._lse_sums.values():  # kept buffers: a generation aborted mid-step leaves partial sums
            sums.zero_()
        if not self.keep_buffers:
            self.release()

    def release(self) -> None:
        """Free every cache and index buffer."""
        self.counters = None
        self._shapes: OrderedDict[tuple, None] = OrderedDict()  # shape keys held, least recently used first
        # Every buffer is keyed by its generation's shape key first, so a shape's buffers are freed together.
        self._kv: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (K, V) caches, and their row scales when fp8
        # The output cache, and with reuse "linear" the forecast's state (see _new_output_state).
        self._out: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._index: dict[tuple, torch.Tensor] = {}
        # metric "delta": (previous guided output, per-token scores [P, N] fp32), see _delta_state.
        self._delta: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # metric "attention": per step, the layers' log-sum-exps summed per batch row ([B, K] fp32, keyed by
        # (shape key, K), see _attend), and each prompt's token scores ([P, N] fp32, keyed by (shape key, P), see
        # _attention_scores).
        self._lse_sums: dict[tuple, torch.Tensor] = {}
        self._lse_scores: dict[tuple, torch.Tensor] = {}

    @property
    def held_shapes(self) -> tuple[tuple, ...]:
        """Shape keys (batch, latent height, latent width, device) whose buffers are held, least recently used
        first."""
        return tuple(self._shapes)

    def _hold(self, shape_key: tuple) -> None:
        """Mark ``shape_key`` most recently used; first free the least recently used shapes beyond max_shapes."""
        if shape_key in self._shapes:
            self._shapes.move_to_end(shape_key)
            return
        while len(self._shapes) >= self.max_shapes:
            evicted, _ = self._shapes.popitem(last=False)
            for buffers in (self._kv, self._out, self._index, self._delta, self._lse_sums, self._lse_scores):
                for key in [key for key in buffers if key[0] == evicted]:
                    del buffers[key]
        self._shapes[shape_key] = None

    def retire_calls(self, predicate: Callable[[object], bool]) -> None:
        """Free the K/V and output caches of the calls (names given to begin_step) that satisfy ``predicate``, in
        this generation or kept from an earlier one, and forget that they ran in this generation: a retired call
        that runs again starts as a new call (its first step dense). For calls whose work is over, e.g. the expert
        Wan 2.2's pipeline has switched away from."""
        for buffers in (self._kv, self._out):
            for key in [key for key in buffers if predicate(key[1])]:
                del buffers[key]
        self._seen = {call for call in self._seen if not predicate(call)}

    @property
    def seen_calls(self) -> frozenset:
        """The calls begun in this generation."""
        return frozenset(self._seen)

    @property
    def in_generation(self) -> bool:
        """Whether a generation has run a step and not yet its last one."""
        return self.shape_key is not None and self.step < self.config.num_steps

    @property
    def is_dense(self) -> bool:
        """Whether the current step computes every image token."""
        return self.active is None

    @property
    def num_active(self) -> int:
        """The rows this rank computes at the current step (K, or K / S under context parallelism)."""
        return self.batch_index.shape[1]

    @property
    def shard_tokens(self) -> int:
        """The image tokens of this rank's shard (N, or N / S under context parallelism)."""
        return self.num_tokens // (1 if self.sharding is None else self.sharding.size)

    def _require_step(self, call: str) -> None:
        if not self._calls:
            raise RuntimeError(
                f"{call}() outside a step: call begin_step() first (with apply_ras, the transformer's patched "
                "forward does; if it did not run, something replaced it)"
            )

    # ---- inside the transformer ----
    def begin_step(self, batch: int, height: int, width: int, device: torch.device | str, call: object = None) -> None:
        """Prepare the current step for a transformer batch of latents [batch, C, height, width] on ``device``.

        ``call`` (hashable) names one of several transformer calls a step makes, e.g. diffusers' cache context
        ``"cond"`` / ``"uncond"`` when a pipeline runs CFG as separate calls: each call has its own K/V and output
        caches, and all of them compute the step's one active set. A call that first runs at a RAS step (e.g. the
        second expert of Wan 2.2, named by the adapter in its calls) has no caches to reuse yet, so that step
        computes every token: the active set chosen for it is dropped and the starvation counters are put back as
        they were before that choice (no token was dropped), so the next step's set is chosen by the same rule as
        after any dense step. Such a call must be its step's first. Raises before changing any state, so a refused
        call leaves the generation as it was.
        """
        cfg, p = self.config, self.patch_size
        for name, value in (("batch", batch), ("height", height), ("width", width)):
            _require_size(name, value)
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as err:
            raise TypeError(f"device must be a torch.device or a device string, got {device!r}") from err
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if call in self._calls:
            raise RuntimeError(
                f"the transformer ran twice at step {self.step} (call {call!r}) without observe() between: call "
                "observe(guided) after each step (apply_ras on a pipeline does this through its scheduler)"
            )
        first_run = call not in self._seen
        if first_run and self._calls and self.active is not None:
            raise RuntimeError(
                f"call {call!r} first runs at RAS step {self.step}, after another call of that step: it has no "
                "caches to reuse, and the step's calls must share one active set (a new call must begin its step)"
            )
        if self.step >= cfg.num_steps:
            raise RuntimeError(
                f"step {self.step} is past the configured num_steps={cfg.num_steps}; call reset() to start a new "
                "generation"
            )
        if height % p or width % p:
            raise ValueError(f"latent height and width ({height}, {width}) must be divisible by patch size {p}")
        n = (height // p) * (width // p)
        shape_key = (batch, height, width, device)
        if self.shape_key is None:
            schedule = cfg.token_schedule(n)
        elif shape_key[1:3] != self.shape_key[1:3]:
            raise ValueError(
                f"latent size changed within a generation ({self.shape_key[1]}x{self.shape_key[2]} -> {height}x{width})"
            )
        elif shape_key != self.shape_key:
            raise ValueError(
                f"transformer batch or device changed within a generation ({self.shape_key[0]} on "
                f"{self.shape_key[3]} -> {batch} on {device})"
            )
        if first_run and self.active is not None:
            self._drop_selection()
        k = n if self.active is None else self.active.shape[1]  # observe() checked that its P prompts divide batch
        if self.shape_key is None:
            self.num_tokens, self.schedule, self.shape_key = n, schedule, shape_key
            self._hold(shape_key)
        index = self._index.get((shape_key, k))
        if index is None:
            index = torch.arange(k, device=device).repeat(batch, 1)  # the dense rows; RAS steps overwrite it
            self._index[(shape_key, k)] = index
        if self.active is not None:
            prompts = self.active.shape[0]
            # In place: a captured step graph reads this buffer.
            index.view(batch // prompts, prompts, k).copy_(self.active.expand(batch // prompts, prompts, k))
        self.batch_index = self.kv_index = index
        if self.sharding is not None:  # this rank's K / S indices (ascending, its own shard's) less its offset
            rank, size = self.sharding.rank, self.sharding.size
            local = self._index.get((shape_key, k, rank))
            if local is None:
                local = torch.empty(batch, k // size, dtype=index.dtype, device=device)
                self._index[(shape_key, k, rank)] = local
            rows = k // size
            torch.sub(index[:, rank * rows : (rank + 1) * rows], rank * (n // size), out=local)
            self.batch_index = local
        if self.config.reuse == "linear":
            self._prepare_forecast(shape_key, call, first_run)
        self.call, self.new_call = call, first_run
        self._calls.add(call)
        self._seen.add(call)

    def _prepare_forecast(self, shape_key: tuple, call: object, first_run: bool) -> None:
        """Reuse "linear": the current step index into the device scalar the forecast reads (outside any captured
        graph, which reads the buffer); at a call's first step in a generation, its tokens' last-computed stamps
        back to "never", so nothing is extrapolated from an earlier generation's outputs."""
        step = self._index.get((shape_key, "step"))
        if step is None:
            step = torch.zeros(1, dtype=torch.float32, device=shape_key[3])
            self._index[(shape_key, "step")] = step
        step.fill_(self.step)
        if first_run:
            for key, state in self._out.items():
                if key[:2] == (shape_key, call):
                    state[2].fill_(math.inf)

    def _drop_selection(self) -> None:
        """Make the current step dense and undo its selection's counter update (+1 for every token it dropped)."""
        dropped = torch.ones_like(self.counters, dtype=torch.bool).scatter_(1, self.active, False)
        self.counters -= dropped.to(self.counters.dtype)
        self.active = None

    def _check_rows(self, name: str, t: object, ndim: int, rows: int) -> None:
        """``t`` must be a tensor [B, rows, ...] with this step's batch B."""
        check_tensor(name, t, ndim=ndim)
        batch = self.shape_key[0]
        if tuple(t.shape[:2]) != (batch, rows):
            raise ValueError(
                f"{name} must have shape (B, {rows}, ...) with this step's batch B={batch}, got {tuple(t.shape)}"
            )

    def gather(self, x: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
        """The step's rows of ``x`` [B, N, D] plus the same rows of ``add`` [1 or B, N, D] (summed in fp32), in one
        pass; [B, K, D]. On a dense step every row is gathered, which also yields a contiguous result. Under context
        parallelism: this rank's rows [B, K / S, D] of its shard [B, N / S, D], or all K rows of all N."""
        self._require_step("gather")
        check_tensor("x", x, ndim=3)
        rows = self.num_tokens if x.shape[1] == self.num_tokens else self.shard_tokens
        self._check_rows("x", x, 3, rows)
        return gather_tokens(x, self._index_into(rows), add=add)

    def _index_into(self, rows: int) -> torch.Tensor:
        """The step's indices into ``rows`` tokens: all N (``kv_index``) or this rank's shard (``batch_index``)."""
        return self.kv_index if rows == self.num_tokens else self.batch_index

    def gather_rows(self, table: torch.Tensor) -> torch.Tensor:
        """Active rows of a per-token table [1 or B, N, ...] shared by the layers (e.g. complex RoPE frequencies);
        the table itself on a dense step (it broadcasts). Under context parallelism, of this rank's shard [1 or B,
        N / S, ...] or of all N tokens, as :meth:`gather`."""
        self._require_step("gather_rows")
        check_tensor("table", table)
        batch, n = self.shape_key[0], self.shard_tokens
        if table.dim() < 2 or table.shape[0] not in (1, batch) or table.shape[1] not in (n, self.num_tokens):
            raise ValueError(f"table must have shape (1 or B={batch}, N={n}, ...), got {tuple(table.shape)}")
        if self.is_dense:
            return table
        real = torch.view_as_real(table) if table.is_complex() else table
        rows = gather_tokens(real.reshape(*real.shape[:2], -1), self._index_into(table.shape[1]))
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
        image_queries: int = 0,
    ) -> torch.Tensor:
        """Attention for layer ``key``: q [B, Lq, Hq, d] over the layer's whole-image K/V cache (refreshed with
        the step's k/v [B, K, Hkv, d]) followed by k_extra/v_extra [B, T, Hkv, d]. Returns [B, Lq, Hq, d].

        ``image_queries``: the row of q where the step's K image queries (the rows of k, in the same order) start;
        they are contiguous, ``image_queries + K <= Lq`` (e.g. the text length when q is [text; image]). Metric
        "attention" adds their log-sum-exps (mean over heads) into the step's per-token sums.

        Under context parallelism every argument holds this rank's rows (K / S, T / S, ...) of all heads: diffusers'
        Ulysses all-to-all turns each into all rows (in rank order: ascending token order, as the shards are
        consecutive) of H / S heads, the cache [B, N, Hkv / S, d] is refreshed at the global indices, and the output
        is exchanged back to this rank's rows of all heads. The order of the queries and of the extra keys does not
        matter to attention, so each may mix the ranks' text and image rows; metric "attention" takes the image rows
        of each rank's block of queries (its sums cover this rank's heads; the observe adds the ranks' sums).
        """
        self._require_step("attend")
        self._check_rows("k", k, 4, self.num_active)
        check_tensor("q", q, ndim=4)
        require_int("image_queries", image_queries, 0, q.shape[1] - self.num_active)
        if self.sharding is not None:
            from diffusers.models.attention_dispatch import _all_to_all_dim_exchange as exchange

            group = self.sharding.group
            q, k, v, k_extra, v_extra = (
                None if t is None else exchange(t, scatter_idx=2, gather_idx=1, group=group)
                for t in (q, k, v, k_extra, v_extra)
            )
            out = self._attend(key, q, k, v, k_extra, v_extra, scale, image_queries, self.sharding.size)
            return exchange(out, scatter_idx=1, gather_idx=2, group=group)
        return self._attend(key, q, k, v, k_extra, v_extra, scale, image_queries, 1)

    def _attend(self, key, q, k, v, k_extra, v_extra, scale, image_queries, blocks) -> torch.Tensor:
        """``attend`` on [B, L, H, d] rows: q holds ``blocks`` equal blocks of query rows (one per rank, in rank
        order, under context parallelism), each with its image queries at ``image_queries``."""
        b, _, hkv, d = k.shape
        # Keyed by shape as well: a captured step graph keeps reading the buffers it was captured with.
        cache_key = (self.shape_key, self.call, key, hkv, d, k.dtype)
        caches = self._kv.get(cache_key)
        if caches is None:
            if not self.is_dense:
                raise RuntimeError(
                    f"no K/V cache for layer {key!r} at RAS step {self.step}: a dense step must run first"
                )
            rows = (b, self.num_tokens, hkv)
            dtype = torch.float8_e4m3fn if self.config.kv_cache == "fp8" else k.dtype
            caches = tuple(torch.empty(*rows, d, dtype=dtype, device=k.device) for _ in "kv")
            if self.config.kv_cache == "fp8":  # and each row's scale
                caches += tuple(torch.empty(rows, dtype=torch.float32, device=k.device) for _ in "kv")
            self._kv[cache_key] = caches
        scales = dict(zip(("k_cache_scale", "v_cache_scale"), caches[2:], strict=False))
        scores_attention = self.config.metric == "attention"
        result = cached_kv_attention(
            q, k, v, caches[0], caches[1], self.kv_index, k_extra=k_extra, v_extra=v_extra, scale=scale,
            return_lse=scores_attention, **scales,
        )  # fmt: skip
        if not scores_attention:
            return result
        out, lse = result
        rows = k.shape[1]
        sums = self._lse_sums.get((self.shape_key, rows))
        if sums is None:  # made at the step shape's first (eager) run; a captured graph then adds into it
            sums = torch.zeros(b, rows, dtype=torch.float32, device=k.device)
            self._lse_sums[(self.shape_key, rows)] = sums
        # Each block's image rows, in block order: the rows of k, ascending tokens. In place: no host sync.
        lse = lse.unflatten(2, (blocks, -1))[..., image_queries : image_queries + rows // blocks]
        sums.add_(lse.flatten(2).mean(dim=1))
        return out

    def scatter_output(self, out: torch.Tensor) -> torch.Tensor:
        """Merge the step's per-token output [B, K, F] into the output cache; returns all N rows [B, N, F] (under
        context parallelism: this rank's K / S and N / S rows): the step's rows and, for the others, their cached
        output (``RASConfig.reuse`` "copy") or its first-order forecast ("linear").

        The returned tensor is a buffer of the session: valid until the next step's scatter_output.
        """
        self._require_step("scatter_output")
        self._check_rows("out", out, 3, self.num_active)
        b, _, f = out.shape
        out_key = (self.shape_key, self.call, f, out.dtype)
        state = self._out.get(out_key)
        if state is None:
            if not self.is_dense:
                raise RuntimeError(f"no output cache at RAS step {self.step}: a dense step must run first")
            state = self._new_output_state(b, f, out.dtype, out.device)
            self._out[out_key] = state
        if len(state) == 1:
            scatter_tokens(state[0], self.batch_index, out)
            return state[0]
        return self._forecast(state, out)

    def _new_output_state(self, b: int, f: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The output cache [B, N, F]; with reuse "linear" also each token's previous computed output [B, N, F],
        the steps of its last and previous computations [B, N] fp32 (inf: never) and the result buffer."""
        cache = torch.empty(b, self.shard_tokens, f, dtype=dtype, device=device)
        if self.config.reuse == "copy":
            return (cache,)
        never = torch.full((b, self.shard_tokens), math.inf, dtype=torch.float32, device=device)
        return cache, torch.empty_like(cache), never, torch.empty_like(never), torch.empty_like(cache)

    def _forecast(self, state: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        """Reuse "linear": shift the step's rows into the history (last -> previous, new -> last, with their step
        stamps), then every token's last output extrapolated along the step index, v2 + (v2 - v1) (s - s2) / (s2 -
        s1), with (s1, v1), (s2, v2) its previous and last computations and s the current step: a factor of 0 (a
        copy) where it has no previous computation (s1 "never", or not before s2) and for the step's own rows
        (s = s2). Static shapes and a device-side step (see _prepare_forecast), so a captured step graph replays it."""
        last, prev, stamp_last, stamp_prev, result = state
        rows = self.batch_index.long()
        step = self._index[(self.shape_key, "step")]
        scatter_tokens(prev, rows, gather_tokens(last, rows))
        scatter_tokens(last, rows, out)
        stamp_prev.scatter_(1, rows, stamp_last.gather(1, rows))
        stamp_last.scatter_(1, rows, step.expand(rows.shape))
        gap = stamp_last - stamp_prev
        factor = torch.where(gap > 0, (step - stamp_last) / gap, 0.0).unsqueeze(-1)  # gap -inf / nan: no previous
        v2 = last.float()
        forecast = torch.addcmul(v2, v2 - prev.float(), factor)
        # Where the factor is 0, the last output itself: a never-written (or non-finite) previous must not leak in.
        return result.copy_(torch.where(factor != 0, forecast, last))

    # ---- after the step ----
    def observe(self, guided: torch.Tensor) -> None:
        """Take the step's guided output [P, C, H, W] (inactive rows merged) and choose the next active set."""
        if not self._calls:
            raise RuntimeError(f"observe() at step {self.step} before the transformer ran for that step")
        check_tensor("guided", guided, ndim=4, dtypes=FLOAT_DTYPES)
        batch, height, width, device = self.shape_key
        if tuple(guided.shape[2:]) != (height, width):
            raise ValueError(
                f"guided must have the step's latent height and width ({height}, {width}), got shape "
                f"{tuple(guided.shape)}"
            )
        if guided.shape[0] < 1 or batch % guided.shape[0]:
            raise ValueError(
                f"guided has {guided.shape[0]} prompts, but the transformer batch {batch} is not a multiple of it "
                "(pass the guided output [P, C, H, W], CFG already combined)"
            )
        if guided.device != device:
            raise ValueError(f"guided is on {guided.device} but the step ran on {device}")
        cfg = self.config
        nxt = self.step + 1
        previous, scores = self._delta_state(guided) if cfg.metric == "delta" else (None, None)
        if cfg.metric == "attention":
            scores = self._attention_scores(guided.shape[0])
        if nxt < cfg.num_steps and cfg.is_ras_step(nxt):
            prompts = guided.shape[0]
            if self.counters is None or self.counters.shape != (prompts, self.num_tokens):
                self.counters = torch.zeros(prompts, self.num_tokens, dtype=torch.int32, device=guided.device)
            if cfg.metric == "random" and (self.seed is None or self.seed.device != guided.device):
                # The high 32 bits pick the stream, the low 32 count the selections: seeds s and s + 1 share no draw.
                self.seed = torch.tensor([cfg.seed << 32], dtype=torch.int64, device=guided.device)
            self.active = select_regions(
                guided,
                self.schedule[nxt],
                patch_size=self.patch_size,
                metric=cfg.metric,
                counters=self.counters,
                starvation_scale=cfg.starvation_scale,
                mode=cfg.mode,
                high_ratio=cfg.high_ratio,
                shards=cfg.shards,
                seed=self.seed if cfg.metric == "random" else None,
                previous=previous,
                scores=scores,
            )
        else:
            self.active = None
        if previous is not None:
            # Every observe, dense steps included, so the next one measures each token's change from this output.
            # Scores change only at selections: an observe that selects nothing comes before a dense step, and the
            # observe after that step gives every (recomputed) token a fresh change, so updating them here too
            # would be overwritten unread (unless a recomputed token's output came out bit-identical).
            previous.copy_(guided)
        self.step = nxt
        self._calls.clear()
        if nxt == cfg.num_steps and not self.keep_buffers:
            self.release()  # the generation is over: free the caches rather than keep them allocated

    def _delta_state(self, guided: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Metric delta's buffers for this generation shape and guided layout: ``previous`` (the guided output of
        the last observe) and ``scores`` ([P, N] fp32, each token's last observed change), both zero at a
        generation's first observe. That observe therefore measures the change from zero: the guided output's own
        per-token L2 norm (metric l2's score). It matters only with ``warmup_steps=1``, where that observe selects
        the first RAS step's tokens: they are ranked by the output's magnitude instead of all tying at one score
        (which would leave the choice to token order). With more warm-up steps the first selection compares two
        dense outputs, so every token has a fresh change."""
        key = (self.shape_key, tuple(guided.shape), guided.dtype)
        state = self._delta.get(key)
        if state is None:
            state = (
                torch.zeros(guided.shape, dtype=guided.dtype, device=guided.device),
                torch.zeros(guided.shape[0], self.num_tokens, dtype=torch.float32, device=guided.device),
            )
            self._delta[key] = state
        elif self.step == 0:  # buffers kept from an earlier generation (keep_buffers)
            for t in state:
                t.zero_()
        return state

    def _attention_scores(self, prompts: int) -> torch.Tensor:
        """Metric attention's per-token scores [P, N] fp32 for this generation shape, updated from the step just
        taken: each prompt's rows of the step's sums (its batch rows r, r % P == prompt, added up; the log-sum-exps of
        every self-attention layer and transformer call of the step) replace its scores at the tokens the step
        computed (``kv_index``: every token on a dense step); the others keep their last score. The sums are zeroed
        for the next step. Scores kept from an earlier generation (keep_buffers) need no zeroing: a generation's first
        step is dense, so its observe overwrites every score."""
        batch = self.shape_key[0]
        computed = self.kv_index[:prompts]  # [P, K]: row r of the batch computes prompt r % P's tokens
        sums = self._lse_sums.get((self.shape_key, computed.shape[1]))
        if sums is None:
            raise RuntimeError(
                f"metric 'attention' at step {self.step}: no self-attention ran through attend() in this step"
            )
        if self.sharding is not None:  # each rank summed the means over its H / S heads: the mean over all H
            torch.distributed.all_reduce(sums, group=self.sharding.group)
            sums.div_(self.sharding.size)
        key = (self.shape_key, prompts)
        scores = self._lse_scores.get(key)
        if scores is None:
            scores = torch.zeros(prompts, self.num_tokens, dtype=torch.float32, device=sums.device)
            self._lse_scores[key] = scores
        scores.scatter_(1, computed, sums.view(batch // prompts, prompts, -1).sum(dim=0))
        sums.zero_()
        return scores

    def memory_bytes(self) -> int:
        """Bytes held by the K/V and output caches (reuse "linear": with the forecast's state) and by metric delta's
        and metric attention's buffers now."""
        tensors = [t for buffers in (*self._kv.values(), *self._out.values()) for t in buffers]
        tensors += [t for pair in self._delta.values() for t in pair]
        tensors += [*self._lse_sums.values(), *self._lse_scores.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
