"""Models of the quality study and their weights on disk.

* The DiT: diffusers' ``SD3Transformer2DModel`` in pixel space (RGB in and out, no VAE): 64 x 64 images, patch 2
  (1024 image tokens), 10 joint-attention blocks of width 192 (3 heads x 64), SD3.5-style RMS QK-norm. The width is
  below the issue's suggested 384-512 because the shipped weights must stay under about 30 MB: an SD3 block holds
  ~36 width^2 parameters (half of them in the text stream), so 8 blocks at width 384 are 41 M parameters (79 MiB
  in bf16). At width 192, 10 blocks are 13.1 M parameters; with the caption encoder and the classifier the saved
  files total 29.5 MB.
* The Flux DiT (``--arch flux``): diffusers' ``FluxTransformer2DModel`` on the same 64 x 64 RGB images as
  ``FluxPipeline`` lays out latents (the "latent" is the image itself: 3 channels, packed into 2 x 2 patches of 12
  channels, 1024 tokens; the pipeline without a VAE takes height = width = 8 x 64). 4 double- and 8 single-stream
  blocks of width 192 (3 heads x 64, RoPE axes 16 + 24 + 24), no guidance embedding (classifier-free guidance through
  the pipeline's ``true_cfg_scale``): 10.0 M parameters, 22.5 MB saved with the caption encoder and classifier.
  A double block holds ~36 width^2 parameters and a single block ~15, so its per-token cost over the image stream
  (4 x 18 + 8 x 15 = 192 width^2) is about that of the SD3 study's 10 blocks (180 width^2).
* The Wan DiT (``--arch wan``): diffusers' ``WanTransformer3DModel`` on 8-frame 32 x 32 RGB clips [B, 3, 8, 32, 32],
  the "latent" of ``WanPipeline`` without a VAE (patch (1, 2, 2): 8 x 16 x 16 = 2048 tokens), 8 blocks of width 256
  (4 heads x 64, feed-forward 1024), ``text_dim`` = the caption encoder's width: 9.1 M parameters, 18.7 MB saved
  with the caption encoder. Per image token its blocks hold 8 x 14 width^2 = 7.3 M weights, the Flux model's 7.1 M.
  No classifier: the video metrics (``evaluate.video_errors``) are computed from the pixels.
* :class:`CaptionEncoder`: caption token ids -> learned word, position and phrase embeddings -> a small pre-norm
  transformer; gives the joint-attention states [B, L, 128] and the pooled vector [B, 64]. Trained with the DiT.
* :class:`SceneClassifier`: a small CNN that reads a scene back (per grid cell: shape or empty, colour, size,
  texture; background colour and texture); the task metric of ``evaluate``.

Weights: ``config.json`` (model configuration + training record) and safetensors shards of at most 15 MiB
(``weights-0000i-of-0000n.safetensors``; parameters in bf16, buffers as built), keys prefixed ``transformer.``,
``caption_encoder.`` and (not for Wan) ``classifier.``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data

DIT = dict(
    sample_size=64,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=10,
    attention_head_dim=64,
    num_attention_heads=3,
    joint_attention_dim=128,
    caption_projection_dim=192,
    pooled_projection_dim=64,
    pos_embed_max_size=32,
    qk_norm="rms_norm",
)
FLUX_DIT = dict(
    patch_size=1,
    in_channels=12,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=3,
    joint_attention_dim=128,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(16, 24, 24),
)
FLUX_IMAGE_SIZE = 64
FLUX_VAE_FACTOR = 8  # FluxPipeline without a VAE divides the requested height and width by 8
WAN_DIT = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=128,
    ffn_dim=1024,
    num_layers=8,
    rope_max_seq_len=64,
)
WAN_IMAGE_SIZE = 32
WAN_FRAMES = 8  # frames of a clip: 8 x 16 x 16 = 2048 tokens
# WanPipeline without a VAE falls back to the Wan VAE's factors: latent frames (num_frames - 1) // 4 + 1, latent
# height and width height // 8 and width // 8.
WAN_VAE_FACTOR_TEMPORAL = 4
WAN_VAE_FACTOR_SPATIAL = 8
ENCODER = dict(width=128, layers=2, heads=4, pooled=64)
CLASSIFIER = dict(width=32)

# A toy configuration for CPU tests: 32 x 32 images (256 tokens), two blocks of width 32.
TINY_DIT = dict(
    DIT,
    sample_size=32,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=16,
    pos_embed_max_size=16,
)
TINY_FLUX_DIT = dict(
    FLUX_DIT,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
TINY_WAN_DIT = dict(WAN_DIT, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2)
TINY_ENCODER = dict(width=32, layers=1, heads=2, pooled=16)
TINY_CLASSIFIER = dict(width=8)

CONFIG_FILE = "config.json"
SHARD_BYTES = 15 * 2**20
SHARD_PATTERN = "weights-*-of-*.safetensors"


ARCHS = ("sd3", "flux", "wan")
DEFAULT_STYLE = {"sd3": "shapes", "flux": "detail", "wan": "video"}


def default_config(
    *, arch: str = "sd3", tiny: bool = False, layers: int | None = None, style: str | None = None
) -> dict:
    """The model configuration: ``{"arch", "style", "image_size", "dit", "encoder", "classifier"}`` (Wan: also
    ``"frames"``, and no classifier: ``"classifier"`` is None); ``layers`` sets the SD3 blocks, the Flux
    double-stream blocks or the Wan blocks, ``style`` the scenes' (``data.STYLES``; default ``DEFAULT_STYLE``: the
    video style is Wan's, and Wan's only)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    style = style or DEFAULT_STYLE[arch]
    if style not in data.STYLES:
        raise ValueError(f"style must be one of {data.STYLES}, got {style!r}")
    if (style == "video") != (arch == "wan"):
        raise ValueError(f"style 'video' goes with arch 'wan' and only with it, got style {style!r} for arch {arch!r}")
    encoder = dict(TINY_ENCODER if tiny else ENCODER)
    extra = {}
    if arch == "flux":
        dit = dict(TINY_FLUX_DIT if tiny else FLUX_DIT)
        size = 32 if tiny else FLUX_IMAGE_SIZE
    elif arch == "wan":
        dit = dict(TINY_WAN_DIT if tiny else WAN_DIT)
        size = 16 if tiny else WAN_IMAGE_SIZE
        encoder["vocab_size"] = len(data.VOCAB)  # the motion words
        extra["frames"] = 4 if tiny else WAN_FRAMES
    else:
        dit = dict(TINY_DIT if tiny else DIT)
        size = dit["sample_size"]
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be an int >= 1, got {layers!r}")
        dit["num_layers"] = layers
    return {
        "arch": arch,
        "style": style,
        "image_size": size,
        **extra,
        "dit": dit,
        "encoder": encoder,
        "classifier": None if arch == "wan" else dict(TINY_CLASSIFIER if tiny else CLASSIFIER),
    }


class CaptionEncoder(nn.Module):
    """Caption token ids [B, L] -> (joint-attention states [B, L, width], pooled projection [B, pooled]).

    Each word's input is the sum of three embeddings of equal scale: the word, its position, and its phrase
    (``data.phrases``: which object it describes, or the background, or padding).
    Without order information a caption is a bag of words, in which "a red circle top and a blue square bottom"
    cannot be told from "a blue circle top and a red square bottom"; the phrase embedding lets attention bind
    each object's colour, shape, size and texture to its cell from the first step.
    """

    def __init__(self, width: int, layers: int, heads: int, pooled: int, vocab_size: int = len(data.IMAGE_VOCAB)):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(data.MAX_TOKENS, width))
        self.phrase = nn.Embedding(data.MAX_OBJECTS + 2, width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.pool = nn.Linear(width, pooled)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(ids) + self.position[: ids.shape[1]] + self.phrase(data.phrases(ids))
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return x, self.pool(x.mean(dim=1))


class SceneClassifier(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] -> logits per head of ``data.HEADS`` ([B, 9, C] per cell, else [B, C])."""

    def __init__(self, image_size: int, width: int):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout), cout), nn.GELU()]

        w = width
        self.features = nn.Sequential(
            *block(3, w, 1),
            *block(w, 2 * w, 2),
            *block(2 * w, 4 * w, 2),
            *block(4 * w, 4 * w, 2),
            *block(4 * w, 4 * w, 1),
            nn.Conv2d(4 * w, w, 1),
        )
        side = image_size // 8
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(w * side * side, 256), nn.GELU())
        self.heads = nn.ModuleDict(
            {
                name: nn.Linear(256, classes * (len(data.CELLS) if per_cell else 1))
                for name, (classes, per_cell) in data.HEADS.items()
            }
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(images))
        out = {}
        for name, (classes, per_cell) in data.HEADS.items():
            logits = self.heads[name](h)
            out[name] = logits.view(-1, len(data.CELLS), classes) if per_cell else logits
        return out


@dataclass
class QualityModels:
    transformer: nn.Module
    encoder: CaptionEncoder
    classifier: SceneClassifier | None  # None for Wan: its video metrics are computed from the pixels
    config: dict
    training: dict = field(default_factory=dict)  # the training record saved with the weights

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def arch(self) -> str:
        return self.config.get("arch", "sd3")  # weights saved before the Flux study are SD3's

    @property
    def style(self) -> str:
        return self.config.get("style", "shapes")

    @property
    def frames(self) -> int | None:
        """Frames of a clip (Wan), None for image models."""
        return self.config.get("frames")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (3, S, S), or (3, F, S, S) for a clip (Wan's latent layout)."""
        s = self.image_size
        return (3, s, s) if self.frames is None else (3, self.frames, s, s)

    @property
    def num_tokens(self) -> int:
        """Image tokens of one sample: 2 x 2 pixel patches for every architecture, in every frame of a clip."""
        return (self.image_size // 2) ** 2 * (self.frames or 1)

    def predict(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The velocity v = eps - x_0 of samples ``x`` [B, *sample_shape] at noise levels ``t`` [B] in [0, 1] for
        caption ids [B, L], in each architecture's pipeline conventions: SD3 takes the image and timestep 1000 t;
        Flux takes FluxPipeline's packed tokens, its image and text position ids, and t itself; Wan takes the clip
        [B, C, F, H, W], timestep 1000 t and the caption states as WanPipeline passes them (no pooled vector)."""
        states, pooled = self.encoder(ids)
        if self.arch == "wan":
            return self.transformer(
                hidden_states=x, timestep=t * 1000, encoder_hidden_states=states, return_dict=False
            )[0]
        kwargs = dict(encoder_hidden_states=states, pooled_projections=pooled, return_dict=False)
        if self.arch == "sd3":
            return self.transformer(hidden_states=x, timestep=t * 1000, **kwargs)[0]
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(ids.shape[1], 3, device=x.device, dtype=x.dtype)
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        out = self.transformer(hidden_states=packed, timestep=t, img_ids=img_ids, txt_ids=txt_ids, **kwargs)[0]
        return FluxPipeline._unpack_latents(out, h * FLUX_VAE_FACTOR, w * FLUX_VAE_FACTOR, FLUX_VAE_FACTOR)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks (Flux: double-stream, then single-stream)."""
        if self.arch == "wan":
            return list(self.transformer.blocks)
        return [*self.transformer.transformer_blocks, *getattr(self.transformer, "single_transformer_blocks", [])]

    def modules(self) -> dict[str, nn.Module]:
        out = {"transformer": self.transformer, "caption_encoder": self.encoder, "classifier": self.classifier}
        return {name: module for name, module in out.items() if module is not None}


def build(config: dict, *, adaln_zero: bool = True) -> QualityModels:
    """Fresh models: PyTorch's default initialisation, then (unless ``adaln_zero=False``, e.g. for a random-weight
    model whose output should depend on its input) adaLN-Zero: see :func:`adaln_zero_`."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    classes = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel, "wan": WanTransformer3DModel}
    arch = config.get("arch", "sd3")
    transformer = classes[arch](**config["dit"])
    if adaln_zero:
        adaln_zero_(transformer)
    encoder = CaptionEncoder(**config["encoder"])
    classifier = None if config["classifier"] is None else SceneClassifier(config["image_size"], **config["classifier"])
    return QualityModels(transformer, encoder, classifier, copy.deepcopy(config))


def adaln_zero_(transformer: nn.Module) -> None:
    """Zero the adaptive-norm modulations and the output projection (DiT's adaLN-Zero): every block starts as the
    identity and the model predicts zero, which makes short training runs markedly more stable.

    Wan's blocks take their modulations (shift, scale and gate of the self-attention and of the feed-forward) as the
    sum of a learned per-block table and one projection of the time embedding shared by all blocks
    (``condition_embedder.time_proj``); zeroing both zeroes them all. Its cross-attention adds to the residual
    stream without a gate, so its output projection is zeroed too. The final norm is modulated by the time embedding
    itself (no projection to zero); the zeroed output projection makes the prediction zero all the same."""
    with torch.no_grad():
        if hasattr(transformer, "blocks"):  # Wan
            zero = [transformer.condition_embedder.time_proj, transformer.proj_out]
            for block in transformer.blocks:
                block.scale_shift_table.zero_()
                zero.append(block.attn2.to_out[0])
            for linear in zero:
                linear.weight.zero_()
                linear.bias.zero_()
            return
        norms = [n for block in transformer.transformer_blocks for n in (block.norm1, block.norm1_context)]
        norms += [block.norm for block in getattr(transformer, "single_transformer_blocks", [])]  # Flux
        for norm in norms:
            norm.linear.weight.zero_()
            norm.linear.bias.zero_()
        transformer.norm_out.linear.weight.zero_()
        transformer.norm_out.linear.bias.zero_()
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()


def save(models: QualityModels, out_dir: str | Path, training: dict, dtype: torch.dtype = torch.bfloat16) -> list:
    """Write ``config.json`` and the safetensors shards into ``out_dir`` (old shards there are removed)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for prefix, module in models.modules().items():
        params = {name for name, _ in module.named_parameters()}
        for name, tensor in module.state_dict().items():
            t = tensor.detach().to("cpu")
            if name in params and t.is_floating_point():
                t = t.to(dtype)
            state[f"{prefix}.{name}"] = t.contiguous().clone()
    shards: list[dict] = [{}]
    used = 0
    for key, t in state.items():
        size = t.numel() * t.element_size()
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append({})
            used = 0
        shards[-1][key] = t
        used += size
    for old in out.glob(SHARD_PATTERN):
        old.unlink()
    names = [f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name))
    record = {"config": models.config, "training": training, "shards": names, "dtype": str(dtype).split(".")[-1]}
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return [out / n for n in [CONFIG_FILE, *names]]


def has_weights(weights_dir: str | Path) -> bool:
    return (Path(weights_dir) / CONFIG_FILE).is_file()


def load(weights_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> QualityModels:
    """The saved models, in eval mode, on ``device``: the DiT and caption encoder in ``dtype``, the classifier in
    float32 (it scores images; it is not timed). The DiT's modules that diffusers keeps in float32 when it loads the
    model in a lower precision (``_keep_in_fp32_modules``: Wan's rotary tables, time embedder, norms and modulation
    tables; none for SD3 and Flux) stay in float32, as ``from_pretrained(torch_dtype=...)`` would leave them."""
    from safetensors.torch import load_file

    root = Path(weights_dir)
    if not has_weights(root):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {root}: train with `python -m bench.quality.train --out {root}`")
    record = json.loads((root / CONFIG_FILE).read_text())
    state = {}
    for name in record["shards"]:
        state.update(load_file(str(root / name)))
    models = build(record["config"])
    models.training = record.get("training", {})
    for prefix, module in models.modules().items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        module.load_state_dict(part, strict=True)
    keep = models.transformer._keep_in_fp32_modules or []
    for name, tensor in [*models.transformer.named_parameters(), *models.transformer.named_buffers()]:
        if not tensor.is_floating_point():
            tensor.data = tensor.data.to(device)
        else:
            fp32 = any(module in name.split(".") for module in keep)
            tensor.data = tensor.data.to(device=device, dtype=torch.float32 if fp32 else dtype)
    models.transformer.eval()
    models.encoder.to(device=device, dtype=dtype).eval()
    if models.classifier is not None:
        models.classifier.to(device=device, dtype=torch.float32).eval()
    return models


def score(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample task scores [B] from classifier logits against the requested scene (``data.labels``).

    * ``scene``: 1.0 when every grid cell is read as requested (empty, or the requested shape in the requested
      colour) and the background colour is right; else 0.0. The task metric: the requested shapes and colours,
      in place, and nothing else.
    * ``objects``: share of the requested objects read with the right shape and colour in their cell.
    * ``attributes``: share right among the requested objects' sizes and textures and the background texture.
    """
    pred = {name: value.argmax(dim=-1) for name, value in logits.items()}
    occupied = targets["shape"] > 0
    colour_ok = pred["colour"] == targets["colour"]
    cell_ok = (pred["shape"] == targets["shape"]) & (~occupied | colour_ok)
    scene = cell_ok.all(dim=1) & (pred["background"] == targets["background"])
    objects = (cell_ok & occupied).sum(dim=1) / occupied.sum(dim=1).clamp(min=1)
    right = ((pred["size"] == targets["size"]) & occupied).sum(dim=1)
    right = right + ((pred["texture"] == targets["texture"]) & occupied).sum(dim=1)
    right = right + (pred["background_texture"] == targets["background_texture"])
    attributes = right / (2 * occupied.sum(dim=1) + 1)
    return {"scene": scene.float(), "objects": objects.float(), "attributes": attributes.float()}
