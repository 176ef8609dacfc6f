"""The adapter layer: a model family declares where RAS touches its transformer; ``install`` does the patching.

A :class:`ModelAdapter` subclass names, for one transformer class:

- the gather point (``gather_at``): the module whose output is the image tokens [B, N, D]; RAS keeps the step's
  active rows [B, K, D] there (``gather`` says how, e.g. with the rows of a position or RoPE table it also returns);
- where rotary tables come from (``rope_at``, optional): a module returning per-token tables [1 or B, N, ...], cut
  to the active rows (``rope``);
- the attention modules (``attention``), each with its kind and the diffusers processor class it must have, and the
  RAS processor installed per kind (``processors``);
- the scatter point (``scatter_at``): the output projection, whose [B, K, F] rows are merged into the per-token
  output cache so that the model sees all N rows [B, N, F] after it;
- optionally fused block forwards (``fused_blocks``: block path -> forward, and ``check_fused``): the same maths
  with the per-token work in fused kernels, a speed layer over the points above;
- the forward arguments RAS refuses (``unsupported``) and a per-call hook (``begin_call``);
- whether the pipelines name each transformer call with diffusers' ``cache_context`` (``cache_context_calls``: CFG as
  two calls per step, "cond" and "uncond", each with its own caches), and a hook for the pipeline
  (``patch_pipeline``, e.g. Wan 2.2's second expert).

Every family runs the same RAS semantics, held by :class:`~ras_models.session.RASSession`: gather, cached-K/V
attention (``session.attend``), scatter, and the selection of the next step's tokens. ``install`` patches one
instance through the handle (reversibly), in this order: checks, processors, fused block forwards, gather / rope /
scatter points, the adapter's own extra patches (and ``cache_context``), the model's ``forward``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import RASConfig
from .handle import RASHandle
from .session import RASSession

KINDS = ("self", "joint", "cross")


@dataclass(frozen=True)
class Attention:
    """Attention modules of one kind: every module at ``path``, where ``*`` stands for one path component (e.g.
    ``"transformer_blocks.*.attn"``: the ``attn`` of every block; a block whose ``attn`` is None has none).

    Attributes:
        path: dotted module path below the transformer, ``*`` matching any one component.
        kind: ``"self"`` (image queries over the image keys: one K/V cache per module), ``"joint"`` (image and text
            rows attend together: the image K/V cached per module, the text keys as extra rows) or ``"cross"``
            (image queries over other keys, e.g. a caption: only the queries are reduced, nothing is cached).
        processor: the diffusers attention processor class the module must have when RAS is applied.
    """

    path: str
    kind: str
    processor: type

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise TypeError(f"Attention path must be a non-empty str, got {self.path!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Attention kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.processor, type):
            raise TypeError(f"Attention processor must be a class, got {type(self.processor).__name__}")


class RASProcessor:
    """Base of RAS attention processors: ``(session, key)``, where ``key`` names the module's K/V cache (its path;
    None for cross-attention, which caches nothing). Subclasses implement diffusers' processor call,
    ``__call__(attn, hidden_states, ...)``, on the step's active rows."""

    def __init__(self, session: RASSession, key: str | None):
        self.session = session
        self.key = key


class ModelAdapter:
    """Where RAS touches one transformer class; subclass it, set the declarations, override hooks as needed.

    One instance is made per ``apply_ras`` with the handle and the transformer instance; ``self.session`` is the
    handle's session. The hooks taking ``original`` replace a module's ``forward``: they receive the module's own
    forward and its arguments.
    """

    transformer_class: ClassVar[type]  # the diffusers (or custom) transformer class handled
    family: ClassVar[str]  # the family's name in error messages, e.g. "SD3"
    preset: ClassVar[Callable[[], RASConfig]] = RASConfig  # the config apply_ras uses when given none
    # Whether RAS runs this model under diffusers' Ulysses context parallelism (``enable_parallelism``); see
    # ``docs/parallel.md``. Its gather, rotary and scatter points and its attention then see this rank's shard of the
    # tokens, and ``RASSession.attend`` exchanges them for all the tokens of this rank's heads.
    context_parallel: ClassVar[bool] = False
    token_patch: ClassVar[int | None] = None  # a token's side in latent pixels; None: transformer.config.patch_size
    gather_at: ClassVar[str]  # module path of the gather point
    rope_at: ClassVar[str | None] = None  # module path of the rotary tables' source, if the model has one
    attention: ClassVar[tuple[Attention, ...]]
    processors: ClassVar[dict[str, type[RASProcessor]]]  # kind -> RAS processor ("cross" may keep diffusers')
    processor_hint: ClassVar[str] = ""  # appended to the wrong-processor error, e.g. how to reset processors
    scatter_at: ClassVar[str]  # module path of the scatter point
    # Path pattern of blocks -> their fused forward, (block, *args, **kwargs) -> the block's outputs.
    fused_blocks: ClassVar[dict[str, Callable]] = {}
    unsupported: ClassVar[dict[str, str]] = {}  # forward argument -> why RAS refuses it when it is not None
    # For models whose output is packed tokens: maps the guided output to latents [P, C, H, W] (see RASHandle).
    to_latents: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The pipelines run the transformer under ``transformer.cache_context(name)`` (diffusers' CacheMixin; "cond" /
    # "uncond" when CFG is two calls per step): install keeps the running call's name in ``self.context`` (for
    # ``begin_call`` to pass as ``call``: each call its own caches) and refuses diffusers' caches, which skip blocks
    # on their own schedule (at apply time and at every call).
    cache_context_calls: ClassVar[bool] = False

    def __init__(self, handle: RASHandle, transformer: torch.nn.Module):
        self.handle = handle
        self.session = handle.session
        self.transformer = transformer
        self.context = None  # the cache context the transformer runs under now (with cache_context_calls)

    @classmethod
    def patch_size(cls, transformer: torch.nn.Module) -> int:
        """The session's patch size: ``token_patch``, or the transformer's ``config.patch_size``."""
        return cls.token_patch if cls.token_patch is not None else transformer.config.patch_size

    def check(self) -> None:
        """Refuse (ValueError) a model this adapter cannot run, before anything is patched."""

    def gather(self, original, *args, **kwargs):
        """The gather point's forward: its output [B, N, D] cut to the step's rows [B, K, D]. The output is made
        contiguous first (a no-op if it is): patch embeddings often return a transposed view (diffusers' PatchEmbed)."""
        return self.session.gather(original(*args, **kwargs).contiguous())

    def rope(self, original, *args, **kwargs):
        """The rotary source's forward: its table [1 or B, N, ...] (or tuple of tables) cut to the active rows."""
        tables = original(*args, **kwargs)
        if isinstance(tables, torch.Tensor):
            return self.session.gather_rows(tables)
        return type(tables)(self.session.gather_rows(table) for table in tables)

    def scatter(self, original, *args, **kwargs):
        """The scatter point's forward: its output [B, K, F] merged into the output cache; all N rows [B, N, F]."""
        return self.session.scatter_output(original(*args, **kwargs))

    @staticmethod
    def check_fused(name: str, block: torch.nn.Module) -> None:
        """Refuse (ValueError) a block its fused forward (``fused_blocks``) would not reproduce."""

    def begin_call(self, arguments: dict[str, object]) -> dict[str, object]:
        """Every transformer call, before its step begins, with the call's bound arguments (name -> value): raise
        ValueError for what RAS cannot honour, replace arguments in place where needed, and return extra keywords
        for :meth:`RASHandle.run_step` (``latent_size``, ``call``); none by default."""
        return {}

    def patch_more(self) -> None:
        """Further patches through ``self.handle`` (made after the declared points, before the model's forward)."""

    def patch_pipeline(self, pipe: object) -> None:
        """With a pipeline: called with it once the transformer is patched, before the pipeline is hooked; patch
        more of it here (through handles whose ``remove`` ``self.handle.on_remove`` runs). Nothing by default."""

    def _check_no_cache(self) -> None:
        if self.transformer.is_cache_enabled:
            raise ValueError("RAS does not compose with diffusers' caches; call transformer.disable_cache() first")

    def _cache_context(self, original, name, *args, **kwargs):
        """``transformer.cache_context(name, ...)`` that also keeps ``name`` in ``self.context`` while it runs."""
        with original(name, *args, **kwargs):
            outer, self.context = self.context, name
            try:
                yield
            finally:
                self.context = outer


def refuse_submodule_hooks(transformer: torch.nn.Module, name: str = "transformer") -> None:
    """Raise ValueError if an accelerate hook sits on a submodule of ``transformer`` (sequential offload or a
    device_map): RAS's patches would run beneath hooks that move weights per submodule."""
    hooked = next((path for path, m in transformer.named_modules() if path and hasattr(m, "_hf_hook")), None)
    if hooked is not None:
        raise ValueError(
            f"{name}.{hooked} has an accelerate hook (enable_sequential_cpu_offload or a device_map), which RAS "
            "does not support; use pipe.enable_model_cpu_offload() or no offloading"
        )


def _pattern(path: str) -> re.Pattern:
    """A module path with ``*`` for any one component, as a regex."""
    return re.compile(r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in path.split(".")))


def _modules(root: torch.nn.Module, patterns: list[str]) -> list[tuple[str, torch.nn.Module, int]]:
    """(path, module, index of the matching pattern) of every module below ``root`` matching one of ``patterns``,
    in the model's module order."""
    regexes = [_pattern(path) for path in patterns]
    found = []
    for name, module in root.named_modules():
        index = next((i for i, regex in enumerate(regexes) if regex.fullmatch(name)), None)
        if index is not None:
            found.append((name, module, index))
    return found


def install(adapter: ModelAdapter) -> None:
    """Patch ``adapter.transformer`` for RAS through ``adapter.handle`` (undone by ``handle.remove()``).

    Everything is checked before the first patch, so a refused model is left unpatched.
    """
    handle, transformer, session = adapter.handle, adapter.transformer, adapter.session
    adapter.check()
    if adapter.cache_context_calls:
        adapter._check_no_cache()
    specs = adapter.attention
    modules = _modules(transformer, [spec.path for spec in specs])
    if not modules:
        raise ValueError(f"no attention module of {type(transformer).__name__} matches {[s.path for s in specs]}")
    for name, module, index in modules:
        expected = specs[index].processor
        if type(module.processor) is not expected:
            raise ValueError(
                f"{name} uses {type(module.processor).__name__}; RAS supports {adapter.family} attention with "
                f"diffusers' {expected.__name__} only{adapter.processor_hint}"
            )
    fused = list(adapter.fused_blocks.items())
    blocks = _modules(transformer, [path for path, _ in fused]) if fused else []
    for name, block, _ in blocks:
        adapter.check_fused(name, block)

    for name, module, index in modules:
        kind = specs[index].kind
        if kind in adapter.processors:
            handle.patch(module, "processor", adapter.processors[kind](session, None if kind == "cross" else name))
    for _, block, index in blocks:
        handle.patch(block, "forward", functools.partial(fused[index][1], block))
    handle.wrap_method(handle.watch(adapter.gather_at), "forward", adapter.gather)
    if adapter.rope_at is not None:
        handle.wrap_method(handle.watch(adapter.rope_at), "forward", adapter.rope)
    handle.wrap_method(handle.watch(adapter.scatter_at), "forward", adapter.scatter)
    adapter.patch_more()
    if adapter.cache_context_calls:
        handle.wrap_method(transformer, "cache_context", contextlib.contextmanager(adapter._cache_context))
    handle.to_latents = adapter.to_latents
    handle.on_pipeline = adapter.patch_pipeline

    signature = inspect.signature(transformer.forward)

    def forward(original, *args, **kwargs):
        handle.check()
        bound = signature.bind(*args, **kwargs)
        for name, reason in adapter.unsupported.items():
            if bound.arguments.get(name) is not None:
                raise ValueError(f"RAS does not support {name} ({reason})")
        if adapter.cache_context_calls:
            adapter._check_no_cache()
        extra = adapter.begin_call(bound.arguments)
        return handle.run_step(original, *bound.args, **bound.kwargs, **extra)

    handle.wrap_method(transformer, "forward", forward)


# ---- the registry apply_ras looks adapters up in ----
_registered: dict[type, type[ModelAdapter]] = {}  # transformer class -> adapter, from register_adapter


def _check_declaration(adapter: object) -> None:
    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)) or adapter is ModelAdapter:
        raise TypeError(f"adapter must be a subclass of ras_models.ModelAdapter, got {adapter!r}")
    name = adapter.__name__
    for attribute in ("transformer_class", "family", "gather_at", "attention", "processors", "scatter_at"):
        if not hasattr(adapter, attribute):
            raise TypeError(f"{name} must declare {attribute}")
    if not isinstance(adapter.transformer_class, type):
        raise TypeError(f"{name}.transformer_class must be a class, got {adapter.transformer_class!r}")
    if not adapter.attention or not all(isinstance(spec, Attention) for spec in adapter.attention):
        raise TypeError(f"{name}.attention must be a non-empty tuple of ras_models.Attention")
    for kind in {spec.kind for spec in adapter.attention} - {"cross"} - set(adapter.processors):
        raise ValueError(f"{name}.processors has no RAS processor for its {kind!r} attention")
    if not isinstance(adapter.fused_blocks, dict) or not all(callable(f) for f in adapter.fused_blocks.values()):
        raise TypeError(f"{name}.fused_blocks must map block path patterns to forward functions")


def register_adapter(adapter: type[ModelAdapter]) -> None:
    """Make ``apply_ras`` handle ``adapter.transformer_class`` (and pipelines holding one) with ``adapter``.

    A registered adapter takes precedence over a built-in one for the same class; registering another adapter for
    a class replaces the previous registration. Raises TypeError/ValueError if the declaration is incomplete.
    """
    _check_declaration(adapter)
    _registered[adapter.transformer_class] = adapter


def _builtin() -> tuple[type[ModelAdapter], ...]:
    try:
        from .flux import FluxAdapter
        from .lumina import LuminaAdapter
        from .sd3 import SD3Adapter
        from .wan import WanAdapter
    except ImportError as err:
        raise ImportError(
            "apply_ras needs diffusers and einops: pip install 'ras-kernels[models]' (ras_kernels alone needs neither)"
        ) from err
    return SD3Adapter, LuminaAdapter, FluxAdapter, WanAdapter


def registry() -> dict[type, type[ModelAdapter]]:
    """Transformer class -> adapter: the built-in families, then the registered ones (which take precedence)."""
    return {**{adapter.transformer_class: adapter for adapter in _builtin()}, **_registered}


def find_adapter(transformer: object) -> type[ModelAdapter] | None:
    """The adapter of ``type(transformer)``; None if there is none. A registered adapter is found without
    importing the built-in ones (so without diffusers)."""
    return _registered.get(type(transformer)) or registry().get(type(transformer))
