"""Instance-scoped, reversible patching: what ``apply_ras`` returns."""

from __future__ import annotations

import functools

import torch

from .graphs import StepGraphs
from .session import RASSession

_MISSING = object()


class RASHandle:
    """RAS applied to one model (and optionally its pipeline's scheduler); ``remove()`` undoes every patch.

    Also a context manager: ``with apply_ras(pipe): pipe(...)``. Drive a bare transformer yourself with
    :meth:`observe` after each step and :meth:`reset` before each generation.
    """

    def __init__(self, session: RASSession, *, cuda_graphs: bool = True):
        self.session = session
        self.graphs = StepGraphs() if cuda_graphs else None
        self._undo: list[tuple[object, str, object]] = []

    def run_step(self, forward, hidden_states: torch.Tensor, *args, **kwargs):
        """One transformer call: begin the step, then run ``forward`` eagerly or through its CUDA graph.

        Graphs are used for CUDA inputs under ``torch.no_grad()`` (pipelines sample that way); a step shape's first
        call runs eagerly, its second is captured, later ones replay.
        """
        b, _, h, w = hidden_states.shape
        self.session.begin_step(b, h, w, hidden_states.device)
        if self.graphs is None or not hidden_states.is_cuda or torch.is_grad_enabled():
            return forward(hidden_states, *args, **kwargs)
        self.session.keep_buffers = True  # graphs read the caches they were captured with: reuse, never free
        return self.graphs.run(tuple(self.session.batch_index.shape), forward, hidden_states, *args, **kwargs)

    def patch(self, obj: object, name: str, value: object) -> None:
        """Set ``obj.name = value`` on the instance, remembering what to restore."""
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def wrap_method(self, obj: object, name: str, wrapper) -> None:
        """Replace the bound method ``obj.name`` by ``wrapper(original, *args, **kwargs)`` on this instance."""
        original = getattr(obj, name)
        self.patch(obj, name, functools.wraps(original)(functools.partial(wrapper, original)))

    def remove(self) -> None:
        """Restore every patched attribute exactly (instance attributes deleted or put back) and free caches."""
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        if self.graphs is not None:
            self.graphs.clear()
        self.session.keep_buffers = False
        self.session.release()
        self.session.reset()

    def observe(self, guided: torch.Tensor) -> None:
        """Hand the step's guided output [P, C, H, W] to the controller (pipelines do this through the scheduler)."""
        self.session.observe(guided)

    def reset(self) -> None:
        """Start a new generation."""
        self.session.reset()

    def __enter__(self) -> RASHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def hook_scheduler(handle: RASHandle, scheduler: object) -> None:
    """Reset at ``set_timesteps`` (a new generation) and observe the guided output handed to ``step``."""
    session = handle.session

    def set_timesteps(original, *args, **kwargs):
        result = original(*args, **kwargs)
        steps = len(scheduler.timesteps)
        if steps != session.config.num_steps:
            raise ValueError(
                f"the pipeline runs {steps} denoising steps but the RASConfig was made for "
                f"num_steps={session.config.num_steps}; pass num_inference_steps={session.config.num_steps} or "
                f"apply RAS with a config for {steps} steps (e.g. RASConfig.sd3(num_steps={steps}, ...))"
            )
        session.reset()
        return result

    def step(original, model_output, *args, **kwargs):
        session.observe(model_output)
        return original(model_output, *args, **kwargs)

    handle.wrap_method(scheduler, "set_timesteps", set_timesteps)
    handle.wrap_method(scheduler, "step", step)
