"""Train the quality study's models: the scene classifier, then the DiT (rectified flow) with its caption encoder.

    python -m bench.quality.train --minutes 9 --out bench/quality/weights     # GPU: everything within 9 minutes
    python -m bench.quality.train --steps 9000 --classifier-steps 4000 --seed 0 --out bench/quality/weights

With ``--minutes`` the DiT's step count is fixed early (from the measured time of steps 10..40, before the
learning-rate warm-up ends, so the schedule is that of a run given ``--steps``); the saved ``config.json`` records
it with the seed and the command that repeats the run by step count (identical data, noise and schedule; GPU
kernels may still differ in the last bits).

Data: fresh scenes every step, generated on the device (``data.sample_scenes`` / ``render`` / ``tokens``).
DiT objective (rectified flow, as SD3): x_t = (1 - t) x_0 + t eps with t ~ logit-normal(0, 1); the model predicts
v = eps - x_0 from (x_t, 1000 t, caption); captions are dropped (all padding) with probability ``--cfg-dropout`` so
that sampling can use classifier-free guidance. bf16 autocast on CUDA, AdamW, linear warm-up then cosine decay to
10%, gradient clipping at 1, EMA of the weights (the EMA is what is saved, in bf16).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from . import data
from . import model as qmodel


def log(message: str) -> None:
    print(message, flush=True)


def scene_batch(n: int, generator: torch.Generator, size: int):
    """Images [n, 3, size, size], caption ids [n, L] and classifier targets of ``n`` fresh scenes."""
    scenes = data.sample_scenes(n, generator)
    return data.render(scenes, size), data.tokens(scenes), data.labels(scenes)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Classifier augmentation: a random blur mix and Gaussian noise, so that imperfect samples still read."""
    b = images.shape[0]
    dev = images.device
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator, device=dev) * (
        torch.rand(b, 1, 1, 1, generator=generator, device=dev) < 0.5
    )
    sigma = 0.15 * torch.rand(b, 1, 1, 1, generator=generator, device=dev)
    noise = torch.randn(images.shape, generator=generator, device=dev)
    return images + mix * (blurred - images) + sigma * noise


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
        images, _, targets = scene_batch(args.classifier_batch, generator, models.image_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(augment(images, generator))
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
def classifier_accuracy(classifier, n: int, generator: torch.Generator, size: int, batch: int = 256) -> dict:
    """Mean task scores of ``classifier`` on ``n`` fresh clean scenes (``model.score``)."""
    totals: dict[str, float] = {}
    for lo in range(0, n, batch):
        images, _, targets = scene_batch(min(batch, n - lo), generator, size)
        scores = qmodel.score(classifier(images.float()), targets)
        for key, value in scores.items():
            totals[key] = totals.get(key, 0.0) + value.sum().item()
    return {key: round(value / n, 4) for key, value in totals.items()}


def dit_forward(transformer, encoder, x_t, t, ids):
    states, pooled = encoder(ids)
    return transformer(
        hidden_states=x_t, encoder_hidden_states=states, pooled_projections=pooled, timestep=t * 1000, return_dict=False
    )[0]


def train_dit(models, args, device, deadline: float) -> dict:
    """Rectified-flow training of the DiT and caption encoder; the EMA weights are copied into the models."""
    transformer = models.transformer.to(device).train()
    encoder = models.encoder.to(device).train()
    params = [p for m in (transformer, encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator(device).manual_seed(args.seed * 1000 + 2)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99), fused=fused)
    forward = torch.compile(dit_forward) if args.compile else dit_forward
    total = args.steps
    # Steps whose duration fixes the step count of a --minutes run: inside the warm-up, whose learning rates do not
    # depend on the step count, so the run's schedule is that of a run given --steps (10..40 at the default 300).
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
        images, ids, _ = scene_batch(args.batch, generator, models.image_size)
        b = images.shape[0]
        drop = torch.rand(b, generator=generator, device=device) < args.cfg_dropout
        ids = torch.where(drop[:, None], torch.full_like(ids, data.PAD_ID), ids)
        t = torch.sigmoid(torch.randn(b, generator=generator, device=device))
        noise = torch.randn(images.shape, generator=generator, device=device)
        x_t = (1 - t.view(b, 1, 1, 1)) * images + t.view(b, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = forward(transformer, encoder, x_t, t, ids)
        loss = F.mse_loss(pred.float(), noise - images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
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
            if args.steps is None and time.time() > deadline + 30:
                log(f"[dit] past the time budget: stopping at step {step}")
                break
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    transformer.eval()
    encoder.eval()
    tail = torch.stack(losses[-200:]).mean().item() if losses else float("nan")
    return {"dit_steps": step, "dit_seconds": round(time.time() - start, 1), "dit_loss_last200": round(tail, 5)}


def reproduce_command(args, dit_steps: int, classifier_steps: int) -> str:
    parts = ["python", "-m", "bench.quality.train", "--steps", str(dit_steps)]
    parts += ["--classifier-steps", str(classifier_steps), "--seed", str(args.seed), "--out", "bench/quality/weights"]
    for flag in ("batch", "lr", "warmup", "ema", "cfg_dropout", "classifier_batch", "classifier_lr", "layers"):
        value = getattr(args, flag)
        if value != PARSER_DEFAULTS[flag]:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    if args.tiny:
        parts.append("--tiny")
    return shlex.join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of the whole run (default 9)")
    p.add_argument("--steps", type=int, default=None, help="DiT steps (overrides --minutes for the DiT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/quality/weights", help="output folder (config.json + safetensors)")
    p.add_argument("--batch", type=int, default=128, help="DiT batch (default 128)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=300, help="learning-rate warm-up steps (default 300)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="share of captions dropped (default 0.1)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale recorded for sampling (default 4)")
    p.add_argument("--classifier-steps", type=int, default=4000)
    p.add_argument("--classifier-batch", type=int, default=256)
    p.add_argument("--classifier-lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default 10; tiny 2)")
    p.add_argument("--tiny", action="store_true", help="toy configuration (32x32, width 32) for CPU tests")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
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
    if args.classifier_steps < 0:
        parser.error("--classifier-steps must be >= 0")
    if not args.minutes > 0:
        parser.error("--minutes must be > 0")
    if args.steps is None and args.warmup < 4:
        parser.error("--warmup must be >= 4 with --minutes (the step count is fixed inside the warm-up)")
    if not 0 <= args.cfg_dropout < 1 or not 0 <= args.ema < 1:
        parser.error("--cfg-dropout and --ema must be in [0, 1)")
    start = time.time()
    budget = args.minutes * 60
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    config = qmodel.default_config(tiny=args.tiny, layers=args.layers)
    models = qmodel.build(config)
    n_dit = sum(p.numel() for p in models.transformer.parameters())
    log(
        f"[setup] {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"DiT {n_dit / 1e6:.2f} M parameters, image {config['image_size']}, seed {args.seed}"
    )
    record = train_classifier(models, args, device, start + 0.15 * budget)
    held_out = torch.Generator(device).manual_seed(args.seed * 1000 + 3)
    record["classifier_clean"] = classifier_accuracy(
        models.classifier, 64 if args.tiny else 1024, held_out, models.image_size
    )
    log(f"[classifier] on clean held-out scenes: {record['classifier_clean']}")
    record.update(train_dit(models, args, device, start + budget - 15))
    import diffusers

    record.update(
        seed=args.seed,
        batch=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        cfg_dropout=args.cfg_dropout,
        guidance=args.guidance,
        minutes=None if args.steps is not None else args.minutes,
        wall_seconds=round(time.time() - start, 1),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        command=shlex.join(["python", "-m", "bench.quality.train", *(sys.argv[1:] if argv is None else argv)]),
    )
    record["reproduce"] = reproduce_command(args, record["dit_steps"], record["classifier_steps"])
    files = qmodel.save(models, args.out, record)
    size = sum(f.stat().st_size for f in files) / 2**20
    log(f"[done] {record['wall_seconds']:.0f}s; wrote {len(files)} files ({size:.1f} MiB) to {args.out}")
    log(f"[done] reproduce: {record['reproduce']}")
    return record


if __name__ == "__main__":
    main()
