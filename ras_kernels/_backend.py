"""Backend choice and the input checks shared by every op.

Each public op runs either its plain-PyTorch reference (``reference.py`` beside it) or its Triton kernels.
The choice is made per call, on the host, before anything is launched:

* ``RAS_BACKEND=torch``  always the reference;
* ``RAS_BACKEND=triton`` always Triton (CPU tensors need ``TRITON_INTERPRET=1``); an error if Triton is missing;
* unset or ``auto``      Triton for CUDA tensors when Triton imports, the reference otherwise.

The Triton kernels have no backward pass: on that path an input that requires grad (with grad mode on) is an error,
not a silently detached result. The references keep autograd.

Every op is defined the same way (:class:`RASOp`): its public function validates the arguments on the host (with
the checks below; nothing is launched before they pass), then calls the op object, which runs the reference, the
Triton launcher (eager calls, CUDA-graph capture included) or the registered ``torch.library`` op (while
torch.compile traces: one opaque node, with a fake implementation for shapes). Launches run under the device of the
op's first tensor argument. Kernels take output pointers first, name pointers ``<tensor>_ptr`` and strides
``stride_<tensor>_<dim>``, and are launched with keyword arguments.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

_BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of the environment variable ``name`` (``default`` when unset or blank; case and surrounding blanks
    ignored), one of ``choices``, else a ValueError naming the variable and the accepted values."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def requested_backend() -> str:
    """The value of ``RAS_BACKEND`` (default ``auto``), validated."""
    return env_choice("RAS_BACKEND", _BACKENDS, "auto")


def _backend_runs_triton(device: torch.device) -> bool:
    backend = requested_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("RAS_BACKEND=triton but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"RAS_BACKEND=triton with tensors on {device.type}: Triton runs on CUDA tensors, "
                "or on CPU tensors only under TRITON_INTERPRET=1"
            )
        return True
    return device.type == "cuda" and _triton_available()


def use_triton(op_name: str, device: torch.device, inputs: dict[str, object]) -> bool:
    """Whether ``op_name`` on tensors of ``device`` runs its Triton kernels.

    When it does, ``inputs`` (name -> tensor or None, the differentiable ones) must not need autograd: the kernels
    have no backward, so a result that silently drops the graph would train nothing.
    """
    if not _backend_runs_triton(device):
        return False
    if torch.is_grad_enabled():
        for name, t in inputs.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(
                    f"{op_name}: {name} requires grad, but the Triton kernels have no backward pass; run the op under "
                    "torch.no_grad() / torch.inference_mode(), or set RAS_BACKEND=torch for the differentiable "
                    "PyTorch reference"
                )
    return True


def _argument_names(schema: str) -> tuple[str, ...]:
    """The argument names of a torch.library schema such as ``(Tensor x, Tensor? add, float eps) -> Tensor``."""
    inside = schema[schema.index("(") + 1 : schema.rindex(") ->")]
    return tuple(arg.split("=")[0].split()[-1] for arg in inside.split(",") if arg.strip())


class RASOp:
    """One op: its Triton launcher, its plain-PyTorch reference and its registered ``torch.library`` op.

    ``schema`` names the arguments in call order (the reference takes them by those names); ``mutates_args`` the
    ones written in place; ``differentiable`` the tensors the reference differentiates (the Triton path refuses
    them when they require grad); ``fake`` gives the output's shape and dtype without computing it (torch.compile).
    ``launch`` may assume validated arguments and is run under the first tensor argument's device.

    Calling the object with validated arguments (in schema order) runs the reference or the kernels, as
    ``RAS_BACKEND`` and the tensors' device decide (:func:`use_triton`).
    """

    def __init__(
        self,
        name: str,
        *,
        schema: str,
        launch: Callable,
        reference: Callable,
        fake: Callable,
        mutates_args: tuple[str, ...] = (),
        differentiable: tuple[str, ...] = (),
    ):
        self.name = name
        self.launch = launch
        self.reference = reference
        self.arg_names = _argument_names(schema)
        unknown = set(mutates_args + differentiable) - set(self.arg_names)
        if unknown:
            raise ValueError(f"{name}: {sorted(unknown)} are not arguments of the schema {schema}")
        self._differentiable = [self.arg_names.index(n) for n in differentiable]
        # custom_op rather than triton_op + wrap_triton: the latter runs the kernels on fake tensors under
        # TRITON_INTERPRET=1 and so breaks torch.compile on the CPU. An explicit schema keeps the registration
        # independent of annotation handling across torch versions.
        self.registered = torch.library.custom_op(
            f"ras_kernels::{name}", self.launch_on_device, mutates_args=mutates_args, schema=schema
        )
        self.registered.register_fake(fake)

    def launch_on_device(self, *args):
        """The launcher under the device of the first tensor argument (Triton launches on the current device)."""
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        with device_of(tensor):
            return self.launch(*args)

    def __call__(self, *args):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        inputs = {self.arg_names[i]: args[i] for i in self._differentiable}
        if not use_triton(self.name, device, inputs):
            return self.reference(**dict(zip(self.arg_names, args, strict=True)))
        # Eager calls launch directly: the op's dispatch would cost more host time than small kernels' GPU time.
        return self.registered(*args) if torch.compiler.is_compiling() else self.launch_on_device(*args)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a tensor of the given kind."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({accepted}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_unit_stride(name: str, t: torch.Tensor) -> None:
    """The kernels address rows through strides but need each row contiguous (unit stride in the last dimension)."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride in its last dimension (rows contiguous), got strides {tuple(t.stride())}"
        )


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """An output written in place must give every element its own memory: in a broadcast (stride-0) view every
    sample would overwrite the same rows. Sorted by stride, each dimension must step past everything the smaller
    ones reach; a layout that fails this is refused even in the rare case where its elements happen not to collide
    (interleaved dimensions), which no real cache or counter tensor has."""
    if t.numel() == 0:
        return
    dims = [(st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1]
    if torch.compiler.is_compiling():
        # Tracing may see symbolic sizes, which dynamo cannot sort: refuse the broadcast case (a zero stride) only.
        overlap = any(stride == 0 for stride, _ in dims)
    else:
        reach, overlap = 0, False  # reach: the largest offset the dimensions with smaller strides span
        for stride, size in sorted(dims):
            overlap |= stride <= reach
            reach += stride * (size - 1)
    if overlap:
        raise ValueError(
            f"{name} is written in place, so its elements must not share memory, but sizes {tuple(t.shape)} with "
            f"strides {tuple(t.stride())} make them overlap (a broadcast / expanded view?); pass a tensor with "
            "its own storage, e.g. .clone() it"
        )


def debug_checks_enabled() -> bool:
    """``RAS_DEBUG=1``: index values of CUDA tensors are checked too (this synchronises with the host)."""
    return os.environ.get("RAS_DEBUG", "0").strip() == "1"


def validate_index(
    name: str, idx: object, batch: int, num_tokens: int, device: torch.device, *, distinct: bool = False
) -> torch.Tensor:
    """Check ``idx`` is a [batch, K] int32/int64 tensor with 1 <= K <= num_tokens on ``device``.

    Its values must lie in [0, num_tokens) and, with ``distinct`` (rows written in place), differ within a sample.
    They are checked on the host for CPU tensors (no synchronisation; out-of-range rows would read or write outside
    the tensor), and for CUDA tensors only with ``RAS_DEBUG=1`` (one host synchronisation, never on the hot path).
    """
    check_tensor(name, idx, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if idx.shape[0] != batch:
        raise ValueError(f"{name} has batch {idx.shape[0]}, expected {batch}")
    if not 1 <= idx.shape[1] <= num_tokens:
        raise ValueError(f"{name} must select between 1 and N={num_tokens} tokens, got K={idx.shape[1]}")
    readable = idx.device.type == "cpu" or (idx.is_cuda and debug_checks_enabled())
    if not readable or idx.numel() == 0 or torch.compiler.is_compiling():
        return idx
    if bool(((idx < 0) | (idx >= num_tokens)).any()):
        raise ValueError(
            f"{name} holds token indices outside [0, N={num_tokens}): min {int(idx.min())}, max {int(idx.max())}"
        )
    if distinct and idx.shape[1] > 1:
        ordered = idx.sort(dim=1).values
        repeats = ordered[:, 1:] == ordered[:, :-1]
        if bool(repeats.any()):
            sample, j = (int(v) for v in repeats.nonzero()[0])
            raise ValueError(
                f"{name} must hold distinct token indices within a sample (those rows are written in place); "
                f"sample {sample} repeats token {int(ordered[sample, j])}"
            )
    return idx


def row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch stride, row stride) of a [B, N, D] tensor, 0 for a dimension of size 1 (never stepped along)."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_float(name: str, value: object, *, positive: bool = False) -> float:
    """A real number (not a bool), optionally > 0; a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """An int (not a bool) in [low, high]; a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {accepted}, got {value}")
    return value


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())
