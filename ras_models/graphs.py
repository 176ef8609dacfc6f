"""CUDA graphs for transformer steps: one graph per distinct step shape, replayed with fresh inputs.

At low ratios an eager RAS step is bound by kernel launches and host work, not by the GPU. Every active-token
count of a generation is known before sampling starts, so each distinct shape (dense, and each K) is captured once
and then replayed: the step's tensor inputs are copied into the graph's static buffers, the graph runs, and the
output is cloned out (so callers may keep it, as multistep solvers do). The first call of a shape runs eagerly
(which also warms up cuBLAS, cuDNN and Triton: a graph cannot capture a kernel's compilation or autotuning) and is
captured right after, so every later call of that shape replays: a schedule whose active count changes every step
(Lumina-Next's dynamic one) runs its first generation eagerly and every later one from graphs.

Everything a step reads that changes between steps must be a tensor input or live in a buffer the caller refills
in place (the active indices, the caches); non-tensor arguments are part of the graph's key.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _split(value):
    """Tensors found in ``value`` (nested lists/tuples/dicts) and a hashable description of the rest."""
    if isinstance(value, torch.Tensor):
        return [value], ("tensor", tuple(value.shape), value.dtype, value.device, tuple(value.stride()))
    if isinstance(value, (list, tuple)):
        parts = [_split(v) for v in value]
        return [t for p in parts for t in p[0]], (type(value).__name__, tuple(p[1] for p in parts))
    if isinstance(value, dict):
        parts = {k: _split(v) for k, v in value.items()}
        return [t for p in parts.values() for t in p[0]], ("dict", tuple((k, p[1]) for k, p in sorted(parts.items())))
    return [], ("const", repr(value))


def _rebuild(value, tensors):
    """``value`` with its tensors replaced, in order, by the next items of the iterator ``tensors``."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _rebuild(v, tensors) for k, v in value.items()}
    return value


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every capture on ``device`` runs on. cuBLAS and cuBLASLt keep a workspace per (handle,
    stream), made at the stream's first matmul and kept for the process (32 MiB and more on Hopper). Made inside a
    capture, it comes from that graph's private pool and keeps the pool reserved after its graphs are destroyed;
    with a new stream per capture every dropped generation shape left one pool behind (the GPU suite's
    alternating-shapes test: +70 MB per shape switch). So captures share one stream per device, and its
    workspaces are made here, outside any capture, by two small matmuls (cuBLAS and cuBLASLt's bias epilogue)."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            a = torch.ones(16, 16, device=device, dtype=torch.float16)
            torch.nn.functional.linear(a @ a, a, a[0])
        torch.cuda.current_stream(device).wait_stream(stream)
        _CAPTURE_STREAMS[device] = stream
    return stream


class _Graph:
    def __init__(self, fn: Callable, args: tuple, kwargs: dict, pool):
        inputs, _ = _split((args, kwargs))
        # A CPU tensor input (e.g. the RoPE table LuminaPipeline builds on the host every step, which the model
        # moves to the GPU itself) gets a static copy on the GPU: the model's own move is then a no-op, and a
        # host-to-device copy, which a graph cannot capture, happens in replay() before the graph runs.
        device = torch.device("cuda", torch.cuda.current_device())
        self.static_inputs = [t.to(device, copy=True) if t.device.type == "cpu" else t.clone() for t in inputs]
        static_args, static_kwargs = _rebuild((args, kwargs), iter(self.static_inputs))
        self.graph = torch.cuda.CUDAGraph()
        # Captured on the side stream of the inputs' device (torch.cuda.graph's default capture stream is made once,
        # on the device current then: with models on two devices it would record this one's work on another
        # device's stream). Not through torch.cuda.graph: it synchronises the device and empties the allocator's
        # cache before every capture, so each step shape met in a first generation would hand back the memory of
        # the eager steps and allocate it again.
        current = torch.cuda.current_stream(device)
        stream = _capture_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool=pool)
            try:
                self.static_output = fn(*static_args, **static_kwargs)
            finally:
                self.graph.capture_end()
        current.wait_stream(stream)

    def replay(self, args: tuple, kwargs: dict):
        inputs, _ = _split((args, kwargs))
        for static, fresh in zip(self.static_inputs, inputs, strict=False):
            if static.data_ptr() != fresh.data_ptr():
                static.copy_(fresh)
        self.graph.replay()
        outputs, _ = _split(self.static_output)
        return _rebuild(self.static_output, iter([t.clone() for t in outputs]))


class _Group:
    """The graphs of one generation shape and the memory pool they share (they are replayed one at a time)."""

    def __init__(self):
        self.graphs: dict[object, _Graph] = {}
        self.pool = None


class StepGraphs:
    """Captured transformer steps; ``run(key, fn, *args, **kwargs)`` replays or captures.

    Steps run in the group chosen by ``use_group`` (default: one group). The handle uses the generation's shape
    (batch, latent height, latent width, device): the graphs of a group read that shape's cache buffers and share
    one private memory pool, so dropping a group (``keep_only``) destroys its graphs and frees its whole pool.
    Pools are per group rather than one for all: a CUDA graph pool is only given back once every graph captured
    into it is destroyed, so with one shared pool a dropped shape's memory would stay reserved for later captures
    only. The freed pool is handed back with ``torch.cuda.empty_cache()``, so every allocation (and other
    processes) can reuse it and reserved memory stays flat as shapes come and go.
    """

    def __init__(self):
        self._groups: dict[object, _Group] = {}
        self._group: object = None

    def use_group(self, group: object) -> None:
        """Run the following steps in ``group``."""
        self._group = group

    def run(self, key: object, fn: Callable, *args, **kwargs):
        _, layout = _split((args, kwargs))
        full_key = (key, layout)
        entry = self._groups.setdefault(self._group, _Group())
        graph = entry.graphs.get(full_key)
        if graph is not None:
            return graph.replay(args, kwargs)
        # First time: run eagerly (it warms up libraries and autotuners; its result is the step's result), then
        # capture; the capture records the step without running it.
        result = fn(*args, **kwargs)
        if entry.pool is None:
            entry.pool = torch.cuda.graph_pool_handle()
        try:
            entry.graphs[full_key] = _Graph(fn, args, kwargs, entry.pool)
        except RuntimeError as err:
            raise RuntimeError(
                "capturing the transformer step in a CUDA graph failed (something in the step synchronises with "
                "the host or changes shape); apply RAS with cuda_graphs=False to run eagerly"
            ) from err
        return result

    def drop_keys(self, predicate: Callable[[object], bool]) -> None:
        """Destroy the graphs (of every group) whose ``run`` key satisfies ``predicate``. A group left without graphs
        is dropped with its pool: PyTorch frees a pool once no graph captured into it is alive, and refuses a new
        capture into it (an internal assert) until then. A group that keeps graphs keeps its pool, whose freed
        memory its later captures reuse."""
        destroyed = False
        for group in list(self._groups):
            entry = self._groups[group]
            for full_key in [full_key for full_key in entry.graphs if predicate(full_key[0])]:
                del entry.graphs[full_key]
                destroyed = True
            if not entry.graphs:
                del self._groups[group]
        if destroyed:
            torch.cuda.empty_cache()  # return the dropped pools' memory (see the class docstring)

    def groups(self) -> tuple[object, ...]:
        """The groups holding graphs."""
        return tuple(self._groups)

    def keep_only(self, groups) -> None:
        """Drop every group not in ``groups``."""
        self._drop([g for g in self._groups if g not in groups])

    def clear(self) -> None:
        self._drop(list(self._groups))

    def _drop(self, groups: list) -> None:
        captured = False
        for group in groups:
            captured |= bool(self._groups.pop(group).graphs)
        if captured:
            torch.cuda.empty_cache()  # return the dropped pools' memory (see the class docstring)

    def __len__(self) -> int:
        return sum(len(entry.graphs) for entry in self._groups.values())
