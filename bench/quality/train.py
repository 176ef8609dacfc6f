"""Train the quality study's models: the scene classifier, then the DiT (rectified flow) with its caption encoder.

    python -m bench.quality.train --out bench/quality/weights     # GPU: everything within --minutes (8.6)
    python -m bench.quality.train --steps 6000 --classifier-steps 2500 --seed 0 --out bench/quality/weights
    python -m bench.quality.train --arch flux                     # the Flux DiT on detail scenes: weights-flux
    python -m bench.quality.train --arch wan                      # the Wan DiT on video clips: weights-wan

``--arch`` picks the DiT (``model.default_config``); everything else is one code path: the scenes (``--style``,
default per architecture), the caption encoder trained with the DiT, the classifier (none for Wan, whose video
metrics are computed from the pixels), the loop, saving.

With ``--minutes`` the DiT's step count is fixed early (from the measured time of steps 10..40, before the
learning-rate warm-up ends, so the schedule is that of a run given ``--steps``); the saved ``config.json`` records
it with the seed and the command that repeats the run by step count (identical data, noise and schedule; GPU
kernels may still differ in the last bits).

Data: fresh scenes every step, generated on the device (``data.sample_scenes`` / ``render`` / ``tokens``).
DiT objective (rectified flow, as SD3): x_t = (1 - t) x_0 + t eps with t ~ logit-normal(``--t-mean``, 1); the
default mean 1 puts 35% of the samples above t = 0.8, where only the caption tells where objects go and which colour
and shape each has (at mean 0, 8%: a first run learned backgrounds and sizes but not layout or binding). The model
predicts v = eps - x_0 from (x_t, 1000 t, caption); captions are dropped (all padding) with probability
``--cfg-dropout`` so that sampling can use classifier-free guidance. bf16 autocast on CUDA, each joint-attention
block torch.compiled (``--compile``, on by default; training falls back to eager if the first compiled step fails
with a compiler error), PyTorch's cuDNN attention backend off while training (:func:`no_cudnn_attention`), AdamW,
linear warm-up then cosine decay to 10%, gradient clipping at 1, EMA of the weights (the EMA is what is saved, in
bf16).

The classifier trains first, on scenes degraded the way samples are (see :func:`augment`). After the DiT, the saved
weights sample held-out prompts (not the evaluation's) at each ``--guidance`` scale; the scale whose samples the
classifier reads best is recorded for sampling, with the scores of every scale. Wan (video clips) has no classifier:
its DiT gets the whole budget, and the scale with the smallest trajectory error (``evaluate.video_errors``) is
recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from . import data
from . import model as qmodel

VALIDATION_STEPS = 28  # Euler steps of the guidance validation: the evaluation's main step count
VALIDATION_SECONDS = 4  # time kept per guidance scale for the validation (128 prompts take about 2 s on an H200)


def log(message: str) -> None:
    print(message, flush=True)


def scene_batch(n: int, generator: torch.Generator, size: int, style: str, frames: int | None = None):
    """Images [n, 3, size, size] (video: clips [n, 3, frames, size, size]), caption ids [n, L] and classifier targets
    of ``n`` fresh scenes of ``style``."""
    scenes = data.sample_scenes(n, generator, style)
    return data.render(scenes, size, style, frames), data.tokens(scenes), data.labels(scenes)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Classifier augmentation: the degradations of a diffusion sample, so that the classifier reads whether the
    requested content is there rather than exact edges. Per image: a smooth warp (shift up to 2 pixels, scale
    +-4%, edges wobbled by up to a pixel), a blur of random strength, per-channel gain and offset, Gaussian noise.
    Shapes stay far apart in silhouette, so the shape classes remain separable."""
    b, c, s, _ = images.shape
    dev = images.device

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, generator=generator, device=dev) * 2 - 1

    theta = torch.zeros(b, 2, 3, device=dev)
    scale = 1 + 0.04 * uniform(b)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, :, 2] = uniform(b, 2) * (4 / s)  # grid units: 2 per side
    grid = F.affine_grid(theta, [b, c, s, s], align_corners=False)
    wobble = F.interpolate(uniform(b, 2, 6, 6) * (2 / s), size=(s, s), mode="bicubic", align_corners=False)
    x = F.grid_sample(images, grid + wobble.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)
    taps = torch.exp(-0.5 * torch.arange(-2.0, 3.0, device=dev) ** 2)
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).expand(c, 1, 5, 5)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=c)
    mix = (uniform(b, 1, 1, 1) + 1) / 2 * (uniform(b, 1, 1, 1) < 0)  # no blur for half the images
    x = x + mix * (blurred - x)
    x = x * (1 + 0.1 * uniform(b, c, 1, 1)) + 0.05 * uniform(b, c, 1, 1)
    sigma = 0.15 * (uniform(b, 1, 1, 1) + 1) / 2
    return x + sigma * torch.randn(x.shape, generator=generator, device=dev)


def classifier_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for name, value in logits.items():
        total = total + F.cross_entropy(value.flatten(0, -2).float(), targets[name].flatten(), ignore_index=data.IGNORE)
    return total


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_classifier(models, args, device, deadline: float) -> dict:
    """Train the scene classifier on fresh, augmented scenes; stops early at ``deadline`` (time.time())."""
    net = models.classifier.to(device).train()
    generator = torch.Generator(device).manual_seed(args.seed * 1000 + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=args.classifier_lr, weight_decay=0.01)
    start, losses, step = time.time(), [], 0
    for step in range(args.classifier_steps):
        if time.time() > deadline:
            log(f"[classifier] time share used up at step {step}")
            break
        for group in opt.param_groups:
            group["lr"] = args.classifier_lr * lr_factor(step, args.classifier_steps, min(100, args.classifier_steps))
        images, _, targets = scene_batch(args.classifier_batch, generator, models.image_size, models.style)
        images = augment(images, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(images)
        loss = classifier_loss(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.classifier_steps:
            recent = torch.stack(losses[-args.log_every :]).mean().item()
            log(f"[classifier] step {step + 1}/{args.classifier_steps} loss {recent:.4f} {time.time() - start:.0f}s")
    else:
        step = args.classifier_steps
    net.eval()
    return {"classifier_steps": step, "classifier_seconds": round(time.time() - start, 1)}


@torch.no_grad()
def classifier_accuracy(models, n: int, generator: torch.Generator, batch: int = 256) -> dict:
    """Mean task scores of the classifier on ``n`` fresh clean scenes (``model.score``)."""
    totals: dict[str, float] = {}
    for lo in range(0, n, batch):
        images, _, targets = scene_batch(min(batch, n - lo), generator, models.image_size, models.style)
        scores = qmodel.score(models.classifier(images.float()), targets)
        for key, value in scores.items():
            totals[key] = totals.get(key, 0.0) + value.sum().item()
    return {key: round(value / n, 4) for key, value in totals.items()}


def loss_and_grads(models, opt, x_t, t, ids, target, device) -> torch.Tensor:
    """The rectified-flow loss of one batch, back-propagated (gradients of the previous step cleared first)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = models.predict(x_t, t, ids)
    loss = F.mse_loss(pred.float(), target)
    loss.backward()
    return loss


def compile_blocks(models, on: bool = True) -> None:
    """Regional compilation: ``torch.compile`` each transformer block's forward (blocks of one kind share their
    compiled code, so compiling takes seconds, not minutes), fusing the norms, modulations and activations that bound
    eager training at this width; ``on=False`` restores the eager forwards."""
    for block in models.blocks():
        if on:
            block.forward = torch.compile(block.forward)
        else:
            del block.forward


@contextlib.contextmanager
def no_cudnn_attention():
    """PyTorch's cuDNN attention backend off inside (the previous setting restored after). On an H200 with torch
    2.11.0+cu130 its backward hit an illegal memory access in the first training step of the Flux model (bf16,
    batch 128, 3 heads x 64, 1024 image + 32 text tokens), compiled or eager; with cuDNN off SDPA picks its flash
    or memory-efficient kernels, which train it. Sampling keeps cuDNN (forward only)."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def train_dit(models, args, device, deadline: float) -> dict:
    """Rectified-flow training of the DiT and caption encoder; the EMA weights are copied into the models."""
    transformer = models.transformer.to(device).train()
    encoder = models.encoder.to(device).train()
    params = [p for m in (transformer, encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator(device).manual_seed(args.seed * 1000 + 2)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99), fused=fused)
    compiled = args.compile
    if compiled:
        compile_blocks(models)
    total = args.steps
    # Steps whose duration fixes the step count of a --minutes run: inside the warm-up, whose learning rates do not
    # depend on the step count, so the run's schedule is that of a run given --steps (10..40 at the default 200).
    calibrate = (min(10, args.warmup // 4), min(40, args.warmup // 2))
    start, losses, step, mark = time.time(), [], 0, 0.0
    while total is None or step < total:
        if total is None and step == calibrate[0]:
            _sync(device)
            mark = time.time()
        if total is None and step == calibrate[1]:
            _sync(device)
            per_step = (time.time() - mark) / (calibrate[1] - calibrate[0])
            total = max(step + 1, int((deadline - time.time()) / per_step) + step)
            log(f"[dit] {1e3 * per_step:.1f} ms/step: training for {total} steps")
        if total is not None and step >= total:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, total or 10**9, args.warmup)
        images, ids, _ = scene_batch(args.batch, generator, models.image_size, models.style, models.frames)
        b = images.shape[0]
        drop = torch.rand(b, generator=generator, device=device) < args.cfg_dropout
        ids = torch.where(drop[:, None], torch.full_like(ids, data.PAD_ID), ids)
        t = torch.sigmoid(args.t_mean + torch.randn(b, generator=generator, device=device))
        noise = torch.randn(images.shape, generator=generator, device=device)
        tb = t.view(b, *[1] * (images.dim() - 1))  # broadcast over the sample dimensions
        x_t = (1 - tb) * images + tb * noise
        batch = (x_t, t, ids, noise - images, device)
        try:
            loss = loss_and_grads(models, opt, *batch)
        except Exception as error:  # a compiler failure shows in the first step; train eagerly instead
            # Not after a device error: the CUDA context is unusable then, eager steps included.
            if not (compiled and step == 0) or isinstance(error, torch.AcceleratorError):
                raise
            log(f"[dit] torch.compile failed ({type(error).__name__}: {error}); training eagerly")
            compile_blocks(models, on=False)
            compiled = False
            loss = loss_and_grads(models, opt, *batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == total:
            recent = torch.stack(losses[-args.log_every :]).mean().item()
            if not math.isfinite(recent):
                raise RuntimeError(f"DiT training diverged at step {step} (loss {recent})")
            elapsed = time.time() - start
            left = f"/{total}" if total is not None else ""
            log(f"[dit] step {step}{left} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s")
            if args.steps is None and time.time() > deadline + 5:
                log(f"[dit] past the time budget: stopping at step {step}")
                break
    if compiled:
        compile_blocks(models, on=False)
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    transformer.eval()
    encoder.eval()
    tail = torch.stack(losses[-200:]).mean().item() if losses else float("nan")
    return {
        "dit_steps": step,
        "dit_seconds": round(time.time() - start, 1),
        "dit_loss_last200": round(tail, 5),
        "compiled": compiled,
    }


@torch.no_grad()
def choose_guidance(weights_dir, args, device) -> dict:
    """Sample ``--validate`` held-out prompts (dense, ``VALIDATION_STEPS`` Euler steps, from the saved weights as
    the evaluation loads them) at each ``--guidance`` scale and score them: with the saved classifier (SD3, Flux),
    or by the video metrics (Wan: ``evaluate.video_errors``). Returns the scale with the most requested objects read
    right (ties: more whole scenes right, then the smaller scale), for Wan the smallest trajectory error (ties: less
    flicker, then the smaller scale), and the scores of every scale."""
    from .evaluate import make_sampler, video_errors

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = qmodel.load(weights_dir, device, dtype)
    gen = torch.Generator().manual_seed(args.seed * 1000 + 4)  # CPU, as the evaluation's prompts; another seed
    scenes = data.sample_scenes(args.validate, gen, models.style)
    noise = torch.randn(args.validate, *models.sample_shape, generator=gen)
    batch = min(args.validate, 128)
    sampler = make_sampler(
        models, data.tokens(scenes), noise, guidance=0.0, device=device, dtype=dtype, batch=batch, graphs=False
    )
    scores = {}
    for scale in args.guidance:
        sampler.guidance = scale
        images, seconds = sampler.generate(VALIDATION_STEPS)
        if models.classifier is None:
            values = video_errors(images.to(device), scenes)
        else:
            targets = {k: v.to(device) for k, v in data.labels(scenes).items()}
            values = qmodel.score(models.classifier(images.to(device).clamp(-1, 1)), targets)
        scores[scale] = {k: round(v.mean().item(), 4) for k, v in values.items()}
        log(f"[validate] guidance {scale:g}: {scores[scale]} ({seconds:.1f}s)")
    if models.classifier is None:
        best = min(args.guidance, key=lambda g: (scores[g]["traj_px"], scores[g]["flicker"], g))
    else:
        best = max(args.guidance, key=lambda g: (scores[g]["objects"], scores[g]["scene"], -g))
    log(f"[validate] guidance {best:g} recorded for sampling")
    return {"guidance": best, "validation": {f"{g:g}": v for g, v in scores.items()}}


def reproduce_command(args, dit_steps: int, classifier_steps: int) -> str:
    parts = ["python", "-m", "bench.quality.train", "--steps", str(dit_steps)]
    parts += ["--classifier-steps", str(classifier_steps), "--seed", str(args.seed), "--out", default_out(args.arch)]
    parts += ["--arch", args.arch] if args.arch != "sd3" else []
    flags = ("batch", "lr", "warmup", "ema", "t_mean", "cfg_dropout", "guidance", "validate", "classifier_batch")
    for flag in (*flags, "classifier_lr", "layers", "style", "compile"):
        value = getattr(args, flag)
        option = "--" + flag.replace("_", "-")
        if value == PARSER_DEFAULTS[flag]:
            continue
        if isinstance(value, bool):
            parts.append(option if value else "--no-" + option[2:])
        elif isinstance(value, list):
            parts += [option, *map(str, value)]
        else:
            parts += [option, str(value)]
    if args.tiny:
        parts.append("--tiny")
    return shlex.join(parts)


def default_out(arch: str) -> str:
    return "bench/quality/weights" if arch == "sd3" else f"bench/quality/weights-{arch}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=qmodel.ARCHS, default="sd3", help="the DiT architecture (default sd3)")
    p.add_argument(
        "--style", choices=data.STYLES, default=None, help="scenes (default: shapes, detail, video for sd3, flux, wan)"
    )
    p.add_argument("--minutes", type=float, default=8.6, help="wall-clock budget of the whole run (default 8.6)")
    p.add_argument("--steps", type=int, default=None, help="DiT steps (overrides --minutes for the DiT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default bench/quality/weights, -flux / -wan for those)")
    p.add_argument("--batch", type=int, default=128, help="DiT batch (default 128)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps (default 200)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights (default 0.995)")
    p.add_argument(
        "--t-mean", type=float, default=1.0, help="mean of the logit-normal training noise levels (default 1)"
    )
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="share of captions dropped (default 0.1)")
    p.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=[4.0, 2.0, 3.0, 5.0, 7.0],
        help="CFG scales tried after training; the best is recorded for sampling, the first without --validate or "
        "should validation fail (default 4 2 3 5 7)",
    )
    p.add_argument(
        "--validate", type=int, default=128, help="held-out prompts that choose the guidance (0: the first scale)"
    )
    p.add_argument("--classifier-steps", type=int, default=2500)
    p.add_argument("--classifier-batch", type=int, default=256)
    p.add_argument("--classifier-lr", type=float, default=1e-3)
    p.add_argument(
        "--layers", type=int, default=None, help="SD3 blocks / Flux double blocks / Wan blocks (default 10 / 4 / 8)"
    )
    p.add_argument("--tiny", action="store_true", help="toy configuration (32x32 or 16x16, width 32) for CPU tests")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile each DiT block for training (default on)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=100)
    return p


PARSER_DEFAULTS = {a.dest: a.default for a in build_parser()._actions}


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch", "classifier_batch", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.classifier_steps < 0 or args.validate < 0:
        parser.error("--classifier-steps and --validate must be >= 0")
    if not args.minutes > 0:
        parser.error("--minutes must be > 0")
    if args.steps is None and args.warmup < 4:
        parser.error("--warmup must be >= 4 with --minutes (the step count is fixed inside the warm-up)")
    if not 0 <= args.cfg_dropout < 1 or not 0 <= args.ema < 1:
        parser.error("--cfg-dropout and --ema must be in [0, 1)")
    start = time.time()
    budget = args.minutes * 60
    # Kept after the DiT: saving, and sampling the validation prompts at every guidance scale.
    reserve = 15 + (VALIDATION_SECONDS * len(args.guidance) if args.validate else 0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out = args.out or default_out(args.arch)
    torch.manual_seed(args.seed)
    config = qmodel.default_config(arch=args.arch, tiny=args.tiny, layers=args.layers, style=args.style)
    models = qmodel.build(config)
    n_dit = sum(p.numel() for p in models.transformer.parameters())
    log(
        f"[setup] {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{args.arch} DiT {n_dit / 1e6:.2f} M parameters, {config['style']} scenes {config['image_size']}, "
        f"seed {args.seed}"
    )
    if models.classifier is None:  # Wan: the video metrics need no classifier
        record = {"classifier_steps": 0}
    else:
        record = train_classifier(models, args, device, start + 0.1 * budget)
        held_out = torch.Generator(device).manual_seed(args.seed * 1000 + 3)
        record["classifier_clean"] = classifier_accuracy(models, 64 if args.tiny else 1024, held_out)
        log(f"[classifier] on clean held-out scenes: {record['classifier_clean']}")
    with no_cudnn_attention():
        record.update(train_dit(models, args, device, start + budget - reserve))
    import diffusers

    record.update(
        seed=args.seed,
        batch=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        cfg_dropout=args.cfg_dropout,
        guidance=args.guidance[0],
        minutes=None if args.steps is not None else args.minutes,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        command=shlex.join(["python", "-m", "bench.quality.train", *(sys.argv[1:] if argv is None else argv)]),
    )
    record["reproduce"] = reproduce_command(args, record["dit_steps"], record["classifier_steps"])
    qmodel.save(models, args.out, record)
    if args.validate:
        record.update(choose_guidance(args.out, args, device))
    record["wall_seconds"] = round(time.time() - start, 1)
    files = qmodel.save(models, args.out, record)
    size = sum(f.stat().st_size for f in files) / 2**20
    log(f"[done] {record['wall_seconds']:.0f}s; wrote {len(files)} files ({size:.1f} MiB) to {args.out}")
    log(f"[done] reproduce: {record['reproduce']}")
    return record


if __name__ == "__main__":
    main()
