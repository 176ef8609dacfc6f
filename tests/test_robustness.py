"""apply_ras / RASSession under real-world use: CPU offload, shared schedulers, models changed after apply_ras,
argument validation, aborted generations and bounded memory across shapes.

CPU tests use tiny random-weight pipelines on the plain-PyTorch path and compare against runs without the twist
(no offload, an own scheduler, a fresh handle or session); the ``gpu`` tests check CUDA graphs and memory.
"""

from __future__ import annotations

import pytest
import torch

from ras_models import RASConfig, RASSession, apply_ras

from ._models import tiny_sd3_pipeline, tiny_sd3_transformer
from ._utils import fake_cuda_graphs, requires_cuda
from .test_integration import TinyDiT, sample

CONFIG = RASConfig(num_steps=3, warmup_steps=1, reset_steps=(), sample_ratio=0.5)  # dense, RAS, RAS
STEPS = CONFIG.num_steps


def _pipe():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, seed, size=(16, 16), steps=STEPS, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    with torch.no_grad():
        out = pipe(
            "a red cat",
            num_inference_steps=steps,
            generator=generator,
            output_type="latent",
            height=height,
            width=width,
            **kwargs,
        )
    return out.images


def _processors(transformer):
    return {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}


# ---- 1. enable_model_cpu_offload ----
@pytest.mark.parametrize("when", ["before", "after"])
def test_model_cpu_offload_composes(when, torch_backend):
    """Offload (here to the CPU itself: diffusers re-installs its accelerate hooks after every call all the same)
    enabled before or after apply_ras: two consecutive RAS calls equal two calls without offload."""
    pipe = _pipe()
    dense = _run(pipe, 1)
    with apply_ras(pipe, CONFIG):
        expected = [_run(pipe, 1), _run(pipe, 2)]
    if when == "before":
        pipe.enable_model_cpu_offload(device="cpu")
    handle = apply_ras(pipe, CONFIG)
    if when == "after":
        pipe.enable_model_cpu_offload(device="cpu")
    got = [_run(pipe, 1), _run(pipe, 2)]
    assert "_hf_hook" in vars(pipe.transformer), "the offload hook must be installed for this test to mean anything"
    assert (expected[0] - dense).abs().max() > 1e-3
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    handle.remove()
    # The hook now wraps the model's own forward, and the pipeline runs dense (twice: the hooks are re-installed).
    assert pipe.transformer._old_forward.__func__ is type(pipe.transformer).forward
    for _ in range(2):
        torch.testing.assert_close(_run(pipe, 1), dense, atol=0, rtol=0)


def test_sequential_offload_is_refused(torch_backend):
    pipe = _pipe()
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="accelerate hook"):
        apply_ras(pipe, CONFIG)
    assert "_ras_handle" not in vars(pipe.transformer)

    pipe = _pipe()
    handle = apply_ras(pipe, CONFIG)
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(RuntimeError, match="accelerate hook"):
        _run(pipe, 1)
    handle.remove()


# ---- 2. pipelines sharing one scheduler; removal order ----
@pytest.mark.parametrize("order", ["fifo", "lifo"])
def test_shared_scheduler_and_any_removal_order(order, torch_backend):
    pipe_a, pipe_b = _pipe(), _pipe()
    pipe_b.scheduler = pipe_a.scheduler
    cls = type(pipe_a)
    processors = {id(p): _processors(p.transformer) for p in (pipe_a, pipe_b)}
    dense = {id(p): _run(p, 1) for p in (pipe_a, pipe_b)}
    scheduler_attrs = set(vars(pipe_a.scheduler))
    solo = {}
    for pipe in (pipe_a, pipe_b):
        with apply_ras(pipe, CONFIG):
            solo[id(pipe)] = _run(pipe, 1)

    handles = [apply_ras(pipe_a, CONFIG), apply_ras(pipe_b, CONFIG)]
    for pipe in (pipe_a, pipe_b, pipe_a):
        torch.testing.assert_close(_run(pipe, 1), solo[id(pipe)], atol=0, rtol=0)
    assert (solo[id(pipe_a)] - dense[id(pipe_a)]).abs().max() > 1e-3
    for handle in handles if order == "fifo" else handles[::-1]:
        handle.remove()

    assert set(vars(pipe_a.scheduler)) == scheduler_attrs
    for pipe in (pipe_a, pipe_b):
        assert type(pipe) is cls
        assert _processors(pipe.transformer) == processors[id(pipe)]
        assert not {"forward", "_ras_handle"} & vars(pipe.transformer).keys()
        torch.testing.assert_close(_run(pipe, 1), dense[id(pipe)], atol=0, rtol=0)


def test_shared_scheduler_nested_call_is_refused(torch_backend):
    pipe_a, pipe_b = _pipe(), _pipe()
    pipe_b.scheduler = pipe_a.scheduler
    with apply_ras(pipe_a, CONFIG), apply_ras(pipe_b, CONFIG):

        def callback(pipe, i, t, kwargs):
            _run(pipe_b, 2)
            return kwargs

        with pytest.raises(RuntimeError, match="own scheduler"):
            _run(pipe_a, 1, callback_on_step_end=callback)
        assert "step" not in vars(pipe_a.scheduler), "the aborted call must unhook the scheduler"


# ---- 3. patched attributes replaced after apply_ras ----
def _fuse(t):
    t.fuse_qkv_projections()


def _set_processors(t):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    t.set_attn_processor(JointAttnProcessor2_0())


def _replace_block_forward(t):
    block = t.transformer_blocks[1]
    block.forward = type(block).forward.__get__(block)


@pytest.mark.parametrize(
    "change,where",
    [
        (_fuse, "transformer_blocks.0.attn.processor"),
        (_set_processors, "transformer_blocks.0.attn.processor"),
        (_replace_block_forward, "transformer_blocks.1.forward"),
    ],
    ids=["fuse_qkv_projections", "set_attn_processor", "block_forward"],
)
def test_replaced_patch_is_detected(change, where, torch_backend):
    pipe = _pipe()
    dense = _run(pipe, 1)
    handle = apply_ras(pipe, CONFIG)
    change(pipe.transformer)
    with pytest.raises(RuntimeError, match=rf"{where} was replaced.*remove\(\)"):
        _run(pipe, 1)
    with pytest.raises(RuntimeError, match=rf"{where} was replaced"):  # a direct transformer call too
        pipe.transformer(torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32), torch.randn(1, 16), torch.ones(1))
    handle.remove()
    torch.testing.assert_close(_run(pipe, 1), dense, atol=1e-5, rtol=0)


# ---- 4. argument validation ----
def _session(**kwargs):
    return RASSession(CONFIG, patch_size=2, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"config": "sd3"}, TypeError, "config"),
        ({"patch_size": True}, TypeError, "patch_size"),
        ({"patch_size": 2.0}, TypeError, "patch_size"),
        ({"patch_size": 0}, ValueError, "patch_size"),
        ({"patch_size": -2}, ValueError, "patch_size"),
        ({"keep_buffers": 1}, TypeError, "keep_buffers"),
        ({"max_shapes": 0}, ValueError, "max_shapes"),
        ({"max_shapes": 2.5}, TypeError, "max_shapes"),
    ],
)
def test_session_constructor_validates(kwargs, error, match):
    args = {"config": CONFIG, "patch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        RASSession(args.pop("config"), **args)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0, 16, 16, "cpu"), ValueError, "batch"),
        ((1.0, 16, 16, "cpu"), TypeError, "batch"),
        ((2, True, 16, "cpu"), TypeError, "height"),
        ((2, 16, -4, "cpu"), ValueError, "width"),
        ((2, 15, 16, "cpu"), ValueError, "divisible"),
        ((2, 16, 16, "nowhere"), TypeError, "device"),
        ((2, 16, 16, 3.5), TypeError, "device"),
    ],
)
def test_begin_step_validates_and_keeps_state(args, error, match):
    session = _session()
    with pytest.raises(error, match=match):
        session.begin_step(*args)
    session.begin_step(2, 16, 16, "cpu")  # the refused call changed nothing
    assert session.is_dense and session.num_active == 64


def test_step_calls_validate(torch_backend):
    session = _session()
    x = torch.randn(2, 64, 8)
    with pytest.raises(RuntimeError, match="begin_step"):
        session.gather(x)
    session.begin_step(2, 16, 16, "cpu")
    for call, match in [
        (lambda: session.gather(torch.randn(2, 63, 8)), "x must have shape"),
        (lambda: session.gather(torch.randn(1, 64, 8)), "x must have shape"),
        (lambda: session.gather([1, 2]), "x must be a torch.Tensor"),
        (lambda: session.gather_rows(torch.randn(1, 60, 4)), "table must have shape"),
        (lambda: session.attend(0, x[:, :, None], x[:, :5, None], x[:, :5, None]), "k must have shape"),
        (lambda: session.scatter_output(torch.randn(2, 65, 8)), "out must have shape"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    session.scatter_output(torch.randn(2, 64, 8))
    for guided, error, match in [
        ([0.0], TypeError, "guided must be a torch.Tensor"),
        (torch.randn(2, 16, 16), ValueError, "guided must have 4 dimensions"),
        (torch.ones(2, 4, 16, 16, dtype=torch.int32), TypeError, "guided must have dtype"),
        (torch.randn(2, 4, 16, 8), ValueError, "latent height and width"),
        (torch.randn(3, 4, 16, 16), ValueError, "not a multiple"),
        (torch.randn(2, 4, 16, 16, device="meta"), ValueError, "guided is on meta"),
    ]:
        with pytest.raises(error, match=match):
            session.observe(guided)
    session.observe(torch.randn(1, 4, 16, 16))  # the refused calls changed nothing
    assert session.step == 1
    with pytest.raises(RuntimeError, match="begin_step"):
        session.gather(x)  # after observe: the step is over


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"max_shapes": 0}, ValueError, "max_shapes"),
        ({"max_shapes": True}, TypeError, "max_shapes"),
        ({"cuda_graphs": "yes"}, TypeError, "cuda_graphs"),
    ],
)
def test_apply_ras_validates(kwargs, error, match):
    transformer = tiny_sd3_transformer()
    with pytest.raises(error, match=match):
        apply_ras(transformer, CONFIG, **kwargs)
    assert not {"forward", "_ras_handle"} & vars(transformer).keys()


# ---- 5. aborted generations ----
@pytest.mark.parametrize("where", ["callback-error", "callback-interrupt", "transformer-error", "interrupt-flag"])
def test_aborted_call_frees_caches_and_next_call_is_fresh(where, torch_backend):
    pipe = _pipe()
    handle = apply_ras(pipe, CONFIG)
    expected = _run(pipe, 1)
    held = []
    error = {"callback-error": ValueError, "callback-interrupt": KeyboardInterrupt}.get(where, RuntimeError)

    def stop(pipe, kwargs):
        held.append(handle.session.memory_bytes())
        if where != "interrupt-flag":
            raise error("stop")
        pipe._interrupt = True  # the pipeline skips its remaining steps and returns normally
        return kwargs

    kwargs, hook = {}, None
    if where == "transformer-error":
        hook = pipe.transformer.transformer_blocks[1].ff.register_forward_pre_hook(
            lambda module, args: stop(pipe, None) if handle.session.step == 1 else None
        )
    else:
        kwargs["callback_on_step_end"] = lambda pipe, i, t, kw: stop(pipe, kw) if i == 1 else kw
    if where == "interrupt-flag":
        _run(pipe, 2, **kwargs)
    else:
        with pytest.raises(error, match="stop"):
            _run(pipe, 2, **kwargs)
    assert held[0] > 0, "the generation must hold caches when it stops"
    assert handle.session.memory_bytes() == 0 and handle.session.step == 0 and not handle.session.held_shapes
    if hook is not None:
        hook.remove()
    torch.testing.assert_close(_run(pipe, 1), expected, atol=0, rtol=0)
    handle.remove()


def _bare_generation(transformer, handle, x, kwargs):
    handle.reset()
    x = x.clone()
    with torch.no_grad():
        for _ in range(STEPS):
            out = transformer(x, **kwargs).sample
            handle.observe(out)
            x = x + out / STEPS
    return x


def test_bare_transformer_exception_aborts(torch_backend):
    transformer = tiny_sd3_transformer()
    x = torch.randn(1, 4, 16, 16)
    kwargs = {
        "encoder_hidden_states": torch.randn(1, 5, 32),
        "pooled_projections": torch.randn(1, 16),
        "timestep": torch.ones(1),
    }
    handle = apply_ras(transformer, CONFIG)
    expected = _bare_generation(transformer, handle, x, kwargs)
    handle.reset()
    with torch.no_grad():
        transformer(x, **kwargs)
        handle.observe(torch.randn(1, 4, 16, 16))
        with pytest.raises(ValueError, match="changed within a generation"):  # refused before the step: no abort
            transformer(torch.cat([x] * 3), **{k: torch.cat([v] * 3) for k, v in kwargs.items()})
        assert handle.session.step == 1 and handle.session.memory_bytes() > 0
        hook = transformer.proj_out.register_forward_pre_hook(lambda module, args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            transformer(x, **kwargs)
    hook.remove()
    assert handle.session.memory_bytes() == 0 and handle.session.step == 0
    torch.testing.assert_close(_bare_generation(transformer, handle, x, kwargs), expected, atol=0, rtol=0)
    handle.remove()


# ---- 6. bounded memory across shapes ----
@pytest.mark.parametrize("metric", ["std", "delta", "attention"])  # delta, attention: their buffers are per shape too
def test_session_evicts_least_recently_used_shape(metric, torch_backend):
    model = TinyDiT().eval()  # 64 tokens: latents 16x16, 8x32, 32x8 with patch 2
    config = RASConfig(num_steps=4, warmup_steps=1, reset_steps=(), sample_ratio=0.5, metric=metric)
    noise = {shape: torch.randn(shape) for shape in [(2, 4, 16, 16), (2, 4, 8, 32), (1, 4, 16, 16)]}
    a, b, c = noise
    fresh, fresh_bytes = {}, {}
    with torch.no_grad():
        for shape, x in noise.items():
            session = RASSession(config, patch_size=2, keep_buffers=True)
            fresh[shape] = sample(model, x, 4, session)
            fresh_bytes[shape] = session.memory_bytes()
        session = RASSession(config, patch_size=2, keep_buffers=True, max_shapes=2)
        for shape, held in [(a, [a]), (b, [a, b]), (a, [b, a]), (c, [a, c]), (b, [c, b])]:
            torch.testing.assert_close(sample(model, noise[shape], 4, session), fresh[shape], atol=0, rtol=0)
            assert session.held_shapes == tuple((s[0], *s[2:], torch.device("cpu")) for s in held)
            assert session.memory_bytes() == sum(fresh_bytes[s] for s in held)


def test_graphs_follow_the_session_lru(monkeypatch, torch_backend):
    """CUDA graph bookkeeping on the CPU: a fake capture that runs the step eagerly on every replay."""
    fake = fake_cuda_graphs(monkeypatch)
    pools, emptied = fake.pools, fake.emptied
    pipe = _pipe()
    sizes = [(16, 16), (16, 24), (16, 16), (24, 16)]
    with apply_ras(pipe, CONFIG, cuda_graphs=False):
        expected = [_run(pipe, 1, size) for size in sizes]

    handle = apply_ras(pipe, CONFIG, max_shapes=2)
    for i, (size, ref) in enumerate(zip(sizes, expected, strict=True)):
        torch.testing.assert_close(_run(pipe, 1, size), ref, atol=0, rtol=0)
        held = handle.session.held_shapes
        assert set(handle.graphs.groups()) == set(held)
        assert [s[1:3] for s in held] == [sizes[j] for j in {0: [0], 1: [0, 1], 2: [1, 0], 3: [0, 3]}[i]]
    assert emptied, "dropping the evicted shape's graphs must hand their pool back"
    assert len(set(map(id, pools))) == 3, "each shape's graphs share one pool of their own"

    # Moved weights (as offloading does) invalidate every graph: the next generation captures again.
    captured = len(pools)
    pipe.transformer.to(torch.float64).to(torch.float32)
    torch.testing.assert_close(_run(pipe, 1, sizes[3]), expected[3], atol=0, rtol=0)
    assert len(pools) > captured

    # An aborted generation drops every graph and cache.
    with pytest.raises(ValueError, match="stop"):
        _run(pipe, 1, callback_on_step_end=lambda *args: (_ for _ in ()).throw(ValueError("stop")))
    assert handle.graphs.groups() == () and handle.session.memory_bytes() == 0
    handle.remove()


# ---- GPU ----
@pytest.mark.gpu
@requires_cuda
def test_model_cpu_offload_with_cuda_graphs_gpu():
    pipe = _pipe().to("cuda")
    config = RASConfig(num_steps=6, warmup_steps=2, reset_steps=(4,), sample_ratio=0.5)
    with apply_ras(pipe, config, cuda_graphs=True) as handle:
        expected = [_run(pipe, seed, steps=6) for seed in (1, 2, 1)]
        assert len(handle.graphs) >= 2
    pipe.enable_model_cpu_offload()
    with apply_ras(pipe, config, cuda_graphs=True) as handle:
        got = [_run(pipe, seed, steps=6) for seed in (1, 2, 1)]
        assert len(handle.graphs) >= 1
        assert pipe.transformer.device.type == "cpu", "the transformer must be offloaded between calls"
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.gpu
@requires_cuda
def test_memory_stays_flat_over_alternating_shapes_gpu():
    """max_shapes=1 over three shapes of equal size: after the first shape, reserved memory must not grow (before
    the cap every shape kept its caches and graph pool), and every shape's result must repeat exactly."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=64,
        caption_projection_dim=512,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    model = model.eval().cuda().half()
    context = torch.randn(2, 7, 64, device="cuda", dtype=torch.float16)
    pooled = torch.randn(2, 32, device="cuda", dtype=torch.float16)
    config = RASConfig(num_steps=6, warmup_steps=2, reset_steps=(4,), sample_ratio=0.25)
    shapes = [(64, 64), (32, 128), (128, 32)]  # 1024 tokens each
    noise = {s: torch.randn(1, 4, *s, device="cuda", dtype=torch.float16) for s in shapes}
    handle = apply_ras(model, config, cuda_graphs=True, max_shapes=1)

    def generate(shape):
        x = noise[shape].clone()
        handle.reset()
        for i in range(config.num_steps):
            t = torch.full((2,), 1000.0 * (1 - i / config.num_steps), device="cuda")
            out = model(torch.cat([x, x]), context, pooled, t, return_dict=False)[0]
            uncond, cond = out.chunk(2)
            guided = uncond + 4.0 * (cond - uncond)
            handle.observe(guided)
            x = x - guided / config.num_steps
        return x

    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        first = {s: generate(s) for s in shapes[:1]}
        torch.cuda.synchronize()
        one_shape = torch.cuda.memory_reserved() - before
        reserved = []
        for _ in range(3):
            for shape in shapes:
                out = [generate(shape), generate(shape)]  # the second replays the captured graphs
                first.setdefault(shape, out[0])
                for o in out:
                    torch.testing.assert_close(o, first[shape], atol=0, rtol=0)
                torch.cuda.synchronize()
                reserved.append(torch.cuda.memory_reserved() - before)
                assert len(handle.session.held_shapes) == 1 and len(handle.graphs.groups()) == 1
    assert one_shape > 0
    assert max(reserved) < 1.5 * one_shape, f"reserved memory grew: one shape {one_shape}, then {reserved}"
    handle.remove()
