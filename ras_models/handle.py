"""Instance-scoped, reversible patching: what ``apply_ras`` returns."""

from __future__ import annotations

import functools
import itertools
import types

import torch

from .config import RASConfig
from .graphs import StepGraphs
from .session import RASSession, Sharding

_MISSING = object()


def _wrapped(original, wrapper):
    """``wrapper(original, *args, **kwargs)`` as a callable that looks like ``original``."""
    return functools.wraps(original)(functools.partial(wrapper, original))


def _get(obj: object, name: str) -> object:
    return type(obj) if name == "__class__" else vars(obj).get(name, _MISSING)


def _places(obj: object, name: str, root: bool = False) -> list[tuple[object, str]]:
    """Where the value of ``obj.name`` can sit, outermost first. A module's own ``forward`` moves beneath hooks:
    for the model itself (``root``), accelerate's (``enable_model_cpu_offload``) keep it in ``_old_forward`` and move
    it back when they are removed (diffusers removes and re-installs them after every pipeline call; on a submodule,
    such a hook is refused: ``RASHandle.check``); diffusers' HookRegistry (e.g. the context-parallel split and gather
    hooks of ``enable_parallelism``) keeps it in its innermost hook's function reference and calls it from there, so
    a patch must sit there to run between the hooks and the module."""
    places = [(obj, name)]
    if name == "forward" and isinstance(obj, torch.nn.Module):
        if root:
            places.append((obj, "_old_forward"))
        refs = getattr(vars(obj).get("_diffusers_hook"), "_fn_refs", None)
        if refs:
            places.append((refs[0], "forward" if refs[0].original_forward is None else "original_forward"))
    return places


def _home(obj: object, name: str, root: bool = False) -> tuple[object, str]:
    """The innermost place of ``obj.name`` that holds a value now (``obj.name`` itself if none does)."""
    return next((p for p in reversed(_places(obj, name, root)) if _get(*p) is not _MISSING), (obj, name))


def _sharding(model: torch.nn.Module, config: RASConfig, supported: bool) -> Sharding | None:
    """This rank's :class:`Sharding` if diffusers' context parallelism is enabled on ``model``
    (``enable_parallelism``), None if no parallelism is; raise ValueError for what RAS cannot run: tensor
    parallelism, context parallelism on a family whose adapter does not support it (``supported``), ring attention,
    ``ulysses_anything``, heads not divisible by the degree, or ``config.shards`` other than the degree."""
    parallel = getattr(model, "_parallel_config", None)
    if parallel is None:
        return None
    name = type(model).__name__
    cp = parallel.context_parallel_config
    if cp is None or not supported:
        raise ValueError(
            f"the {name} runs under diffusers' parallelism (enable_parallelism), which RAS does not support for this "
            "model: RAS runs under context parallelism (ContextParallelConfig(ulysses_degree=P)) on Flux and Wan; "
            "apply RAS to a model without enable_parallelism"
        )
    if cp.ring_degree > 1 or cp.ulysses_anything:
        raise ValueError(
            f"RAS supports diffusers' Ulysses context parallelism with equal shards only, got ring_degree="
            f"{cp.ring_degree}, ulysses_anything={cp.ulysses_anything} (ring attention would need the log-sum-exp of "
            "RAS's cached attention); use ContextParallelConfig(ulysses_degree=P)"
        )
    size = cp.ulysses_degree
    heads = model.config.num_attention_heads
    if heads % size:
        raise ValueError(f"the {name}'s {heads} attention heads are not divisible by ulysses_degree={size}")
    if config.shards != size:
        raise ValueError(
            f"the {name} runs under Ulysses context parallelism of degree {size}, so each rank holds 1/{size} of the "
            f"image tokens: set RASConfig(shards={size}) (got shards={config.shards}) so that every rank keeps the "
            "same count of its own tokens"
        )
    group = cp._ulysses_mesh.get_group()
    return Sharding(group, torch.distributed.get_rank(group), size)


class _Patch:
    """``new`` set in place of ``obj.name`` at its innermost place (:func:`_places`); ``old`` was there before
    (``_MISSING``: nothing, the class's)."""

    def __init__(self, obj: object, name: str, new: object, root: bool):
        self.obj, self.name, self.new, self.root = obj, name, new, root
        holder, attr = _home(obj, name, root)
        self.old = _get(holder, attr)
        setattr(holder, attr, new)

    def slot(self) -> tuple[object, str] | None:
        """Where our value sits now (None: something replaced it)."""
        return next((p for p in _places(self.obj, self.name, self.root) if _get(*p) is self.new), None)

    def undo(self) -> None:
        """Put the old value back where ours sits; leave a value someone else put there since alone."""
        slot = self.slot()
        if slot is None:
            return
        holder, attr = slot
        if self.old is not _MISSING:
            setattr(holder, attr, self.old)
        elif slot == (self.obj, self.name):
            delattr(holder, attr)
        else:  # an instance forward that moved beneath a hook: the class's forward goes there instead
            setattr(holder, attr, types.MethodType(getattr(type(self.obj), self.name), self.obj))


class _Patches:
    """Attributes set on instances. Each is undone only where our value still sits, so several sets of patches
    (several handles, or a handle and a pipeline call) can be undone in any order."""

    def __init__(self):
        self.items: list[_Patch] = []

    def set(self, obj: object, name: str, value: object, root: bool = False) -> None:
        """``root``: ``obj`` is the model itself (see :func:`_places`)."""
        self.items.append(_Patch(obj, name, value, root))

    def undo(self) -> None:
        while self.items:
            self.items.pop().undo()


class RASHandle:
    """RAS applied to one model (and optionally its pipeline); ``remove()`` undoes every patch.

    Also a context manager: ``with apply_ras(pipe): pipe(...)``. Drive a bare transformer yourself with
    :meth:`observe` after each step and :meth:`reset` before each generation.
    """

    def __init__(
        self, session: RASSession, model: torch.nn.Module, *, cuda_graphs: bool = True, context_parallel: bool = False
    ):
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        self.context_parallel = context_parallel  # whether the model's adapter runs under Ulysses (see _sharding)
        # Before anything is patched; check() repeats it at every call (enable_parallelism may come after apply_ras).
        session.sharding = _sharding(model, session.config, context_parallel)
        self.session = session
        self.model = model
        self.graphs = StepGraphs() if cuda_graphs else None
        self._patches = _Patches()
        self._on_remove: list = []  # callbacks remove() runs, last registered first
        self._watched: list[tuple] = []  # (path, parent, attribute, module) that check() requires in place
        # Parameter/buffer addresses the graphs were captured with (none yet: those of now, so that a second handle
        # sharing one set of graphs, Wan 2.2's second expert, does not drop the first's at its first step).
        self._weights = self._weight_addresses()
        # Adapters of models whose output is packed tokens (Flux) set this: it maps the output handed to
        # scheduler.step (or to observe) to the latents [P, C, H, W] that select the next step's tokens.
        self.to_latents = None
        # Adapters that patch more of a pipeline than its transformer (Wan 2.2's second expert) set this:
        # hook_pipeline calls it with the pipeline first.
        self.on_pipeline = None

    def run_step(self, forward, hidden_states: torch.Tensor, *args, latent_size=None, call=None, **kwargs):
        """One transformer call: begin the step, then run ``forward`` eagerly or through its CUDA graph.

        ``hidden_states`` are latents [B, C, H, W], or with ``latent_size=(H, W)`` packed tokens [B, L, C'] of such a
        latent. ``call`` names the call within the step (see ``RASSession.begin_step``). Neither is passed on.
        Graphs are used for CUDA inputs under ``torch.no_grad()`` (pipelines sample that way); a step shape's first
        call runs eagerly and is captured right after, later ones replay. An exception in the step aborts the generation
        (:meth:`abort`). The caller runs :meth:`check` first (the patched forward does, before its adapter reads the
        call's arguments).
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor [B, C, H, W], got {type(hidden_states).__name__}")
        if latent_size is None and hidden_states.dim() != 4:
            raise ValueError(f"hidden_states must be latents [B, C, H, W], got shape {tuple(hidden_states.shape)}")
        graphed = self._use_graphs(hidden_states)
        if graphed:
            self.session.keep_buffers = True  # graphs read the buffers they were captured with: reuse them
        b = hidden_states.shape[0]
        h, w = hidden_states.shape[2:] if latent_size is None else latent_size
        self.session.begin_step(b, h, w, hidden_states.device, call)  # raises before changing any state
        try:
            if self.graphs is not None and self.session.new_call:  # a call's first step in the generation
                self._drop_stale_graphs()
            if not graphed:
                return forward(hidden_states, *args, **kwargs)
            self.graphs.use_group(self.session.shape_key)
            key = (call, tuple(self.session.batch_index.shape))  # each call reads its own caches
            with torch.cuda.device(hidden_states.device):  # capture on the model's device, whichever is current
                return self.graphs.run(key, forward, hidden_states, *args, **kwargs)
        except BaseException:
            self.abort()
            raise

    def _use_graphs(self, hidden_states: torch.Tensor) -> bool:
        # Not under context parallelism: steps with collectives have not been captured or measured yet.
        sharded = self.session.sharding is not None
        return self.graphs is not None and hidden_states.is_cuda and not torch.is_grad_enabled() and not sharded

    def _drop_stale_graphs(self) -> None:
        """At a call's first step in a generation (for one model: step 0; Wan 2.2's second expert: its first step):
        drop the graphs of shapes whose buffers the session freed (least recently used beyond ``max_shapes``), and
        every graph if the weights moved since capture (a captured graph reads them by address:
        ``enable_model_cpu_offload`` or ``pipe.to(...)`` moves them between calls)."""
        weights = self._weight_addresses()
        if weights != self._weights:
            self.graphs.clear()
            self._weights = weights
        self.graphs.keep_only(self.session.held_shapes)

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in itertools.chain(self.model.parameters(), self.model.buffers()))

    def check(self) -> None:
        """Raise RuntimeError if an attribute this handle patched was replaced since (e.g. by
        ``set_attn_processor`` or ``fuse_qkv_projections``): the model would run neither RAS nor dense; a
        ValueError if diffusers' parallelism was enabled on the model since in a way RAS cannot run (:func:`_sharding`);
        otherwise takes this rank's part of the context parallelism into the session."""
        self.session.sharding = _sharding(self.model, self.session.config, self.context_parallel)
        # Per call: the first test is one dict lookup per patch; slot() looks further only for a moved forward.
        for path, parent, attr, module in self._watched:
            if getattr(parent, attr, None) is not module:
                raise RuntimeError(
                    f"transformer.{path} was replaced after apply_ras (e.g. a LoRA loaded onto it or unloaded from "
                    "it), so RAS would no longer see its tokens. Call remove() on the RAS handle, then apply_ras again "
                    "(a LoRA loaded before apply_ras composes)"
                )
        replaced = next((p for p in self._patches.items if _get(p.obj, p.name) is not p.new and p.slot() is None), None)
        if replaced is None:
            return
        names = {id(m): name or "transformer" for name, m in self.model.named_modules()}
        where = f"{names.get(id(replaced.obj), type(replaced.obj).__name__)}.{replaced.name}"
        hint = ""
        if hasattr(replaced.obj, "_hf_hook"):
            hint = (
                " by an accelerate hook (enable_sequential_cpu_offload or a device_map; RAS composes with "
                "enable_model_cpu_offload only)"
            )
        raise RuntimeError(
            f"{where} was replaced after apply_ras{hint}, so the model would run neither RAS nor the dense model. "
            "Call remove() on the RAS handle (it leaves the new value in place), change the model as needed (e.g. "
            "set_attn_processor / unfuse_qkv_projections), then apply_ras again"
        )

    def patch(self, obj: object, name: str, value: object) -> None:
        """Set ``obj.name = value`` on the instance, remembering what to restore."""
        self._patches.set(obj, name, value)

    def wrap_method(self, obj: object, name: str, wrapper) -> None:
        """Replace the bound method ``obj.name`` by ``wrapper(original, *args, **kwargs)`` on this instance.

        A module's own ``forward`` is wrapped beneath the hooks installed on it (an accelerate offload hook, diffusers'
        context-parallel hooks), and is found beneath those installed later too (:func:`_places`).
        """
        root = obj is self.model
        self._patches.set(obj, name, _wrapped(getattr(*_home(obj, name, root)), wrapper), root)

    def watch(self, path: str) -> torch.nn.Module:
        """The model's submodule at ``path``; :meth:`check` raises if it is later replaced there (a module whose
        ``forward`` the handle wraps: a replacement would run without it)."""
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        module = getattr(parent, attr)
        self._watched.append((path, parent, attr, module))
        return module

    def on_remove(self, callback) -> None:
        """Call ``callback()`` when the handle is removed (after the patches are undone), e.g. to give back a
        process-wide resource an adapter took."""
        self._on_remove.append(callback)

    def hook_pipeline(self, pipe: object) -> None:
        """Make each call of ``pipe`` one generation: its class becomes a subclass (for this instance only) whose
        ``__call__`` hooks the pipeline's scheduler for the call and aborts the generation if the call raises."""
        cls = type(pipe)
        if getattr(cls, "_ras_pipeline", False):
            raise RuntimeError("RAS is already applied to this pipeline; call remove() on its handle first")
        if self.on_pipeline is not None:
            self.on_pipeline(pipe)

        @functools.wraps(cls.__call__)
        def __call__(pipe_self, *args, **kwargs):
            return self._call_pipeline(cls.__call__, pipe_self, *args, **kwargs)

        namespace = {"__call__": __call__, "_ras_pipeline": True, "__module__": cls.__module__, "__doc__": cls.__doc__}
        subclass = type(cls.__name__, (cls,), namespace)
        subclass.__qualname__ = cls.__qualname__
        self._patches.set(pipe, "__class__", subclass)

    def _call_pipeline(self, call, pipe, *args, **kwargs):
        if pipe.transformer is not self.model:
            raise RuntimeError(
                "pipe.transformer was replaced after apply_ras; call remove() on the RAS handle and apply RAS again"
            )
        self.check()
        scheduler = pipe.scheduler
        if getattr(scheduler, "_ras_pipeline_call", None) is not None:
            raise RuntimeError(
                "this pipeline's scheduler object is in use by another RAS pipeline call (pipelines sharing one "
                "scheduler cannot run inside each other); give each pipeline its own scheduler, e.g. "
                "pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)"
            )
        hooks = _Patches()
        try:
            hooks.set(scheduler, "_ras_pipeline_call", pipe)
            self._hook_scheduler(hooks, scheduler)
            result = call(pipe, *args, **kwargs)
        except BaseException:
            if self.session.in_generation:
                self.abort()
            raise
        finally:
            hooks.undo()
        if self.session.in_generation:  # the pipeline stopped early (e.g. its interrupt flag): end the generation
            self.session.reset()
        return result

    def _hook_scheduler(self, hooks: _Patches, scheduler: object) -> None:
        """Reset at ``set_timesteps`` (a new generation) and observe the guided output handed to ``step``."""
        session = self.session

        def set_timesteps(original, *args, **kwargs):
            result = original(*args, **kwargs)
            steps = len(scheduler.timesteps)
            if steps != session.config.num_steps:
                raise ValueError(
                    f"the pipeline runs {steps} denoising steps but the RASConfig was made for "
                    f"num_steps={session.config.num_steps}; pass num_inference_steps={session.config.num_steps} or "
                    f"apply RAS with a config for {steps} steps (e.g. the family preset with num_steps={steps})"
                )
            session.reset()
            return result

        def step(original, model_output, *args, **kwargs):
            self.observe(model_output)
            return original(model_output, *args, **kwargs)

        hooks.set(scheduler, "set_timesteps", _wrapped(scheduler.set_timesteps, set_timesteps))
        hooks.set(scheduler, "step", _wrapped(scheduler.step, step))

    def abort(self) -> None:
        """End the current generation after a failure: free every cache and captured graph now; the next
        generation starts as a fresh one."""
        self._free()
        self.session.reset()

    def _free(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        self.session.release()

    def remove(self) -> None:
        """Restore every patched attribute (instance attributes deleted or put back, the pipeline's class put back)
        and free the caches and graphs. An attribute replaced since apply_ras keeps its new value."""
        self._patches.undo()
        while self._on_remove:
            self._on_remove.pop()()
        self._free()
        self.session.keep_buffers = False
        self.session.reset()

    def observe(self, guided: torch.Tensor) -> None:
        """Hand the step's guided output [P, C, H, W] (for Flux: packed [P, L, C'] as the transformer returns it) to
        the controller (pipelines do this through the scheduler)."""
        self.session.observe(guided if self.to_latents is None else self.to_latents(guided))

    def reset(self) -> None:
        """Start a new generation."""
        self.session.reset()

    def __enter__(self) -> RASHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
