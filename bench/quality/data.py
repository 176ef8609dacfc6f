"""Procedural, captioned scenes: one to three coloured shapes on a textured background.

A scene places ``count`` objects (1..3) in distinct cells of a 3 x 3 grid (with a small random offset); each object
has a shape (four silhouettes that stay distinct when blurred: disc, square, triangle, plus-shaped cross), a colour,
a size and a texture (plain or broad diagonal stripes). Objects nearly fill their cell (a big one spans 29% of the
image side) and never overlap. The background has a colour and a texture (plain, horizontal stripes, a checkerboard
or a vertical gradient, stripes and checks with a random phase). Objects occupy their slots in reading order of
their cells, so the caption lists them top left to bottom right, e.g.::

    a small red circle top left and a big blue striped square bottom right on a striped green background

Everything is generated in torch and vectorised over the batch: :func:`sample_scenes` draws the parameters (on the
generator's device), :func:`render` rasterises them (anti-aliased signed-distance shapes), :func:`tokens` builds the
caption token ids directly from the parameters, :func:`phrases` the phrase of each caption word, :func:`labels` the
classifier targets. Images are RGB in [-1, 1].

Three styles share the parameters, captions (the video style adds each object's motion), vocabulary and classifier
targets (``STYLES``):

* ``shapes`` (the SD3 study's): the scenes above.
* ``detail`` (the Flux study's): where region-adaptive sampling should matter, large smooth regions beside a few small
  detailed objects. The background is smooth: ``plain`` is a flat wall, ``gradient`` a sky (vertical gradient, lighter
  towards the horizon at 60% of the height) above a flat, darker wall; striped and checkered backgrounds are not
  drawn. Objects are small (radius 5% or 7.5% of the side: about 6 or 10 pixels across at 64 x 64) and a striped
  one carries 1-pixel vertical stripes (period 2 pixels), detail at the scale of a single token's 2 x 2 patch.
* ``video`` (the Wan study's): clips of ``frames`` frames (``render(..., frames=F)`` gives [B, 3, F, S, S]). The
  background is the detail style's (a flat wall or a sky over a wall) and identical in every frame; one or two
  objects (the detail style's shapes, colours and stripes, radius 10% or 12% of the side: about 6.4 or 7.7 pixels
  across at 32 x 32) each move in a straight line at constant speed, from their start cell (centre plus jitter) to
  the centre of the neighbouring cell in ``direction`` (one cell side over the clip: about 1.5 pixels a frame at
  32 x 32 and 8 frames). The two objects' paths keep their centres at least a cell side apart along one axis in
  every frame (``COMPATIBLE``), so they never overlap. The caption adds the motion after each object's start cell::

      a small red circle top left moving right and a big blue striped square bottom moving up on a plain gray
      background
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
COLOUR_RGB = (
    (0.95, 0.15, 0.12),
    (0.15, 0.85, 0.20),
    (0.20, 0.40, 1.00),
    (0.95, 0.88, 0.12),
    (0.90, 0.20, 0.85),
    (0.15, 0.85, 0.90),
    (0.96, 0.96, 0.96),
)
SIZES = ("small", "big")
SIZE_RADIUS = (0.1, 0.145)  # share of the image side
DETAIL_RADIUS = (0.05, 0.075)  # the same, in the detail style
VIDEO_RADIUS = (0.1, 0.12)  # the same, in the video style
OBJECT_TEXTURES = ("plain", "striped")
BACKGROUNDS = ("black", "gray", "green", "blue", "brown", "purple")
BACKGROUND_RGB = (
    (0.06, 0.06, 0.06),
    (0.42, 0.42, 0.42),
    (0.12, 0.32, 0.14),
    (0.10, 0.14, 0.40),
    (0.38, 0.24, 0.12),
    (0.28, 0.12, 0.34),
)
BACKGROUND_TEXTURES = ("plain", "striped", "checkered", "gradient")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
MAX_OBJECTS = 3
JITTER = 0.02  # largest object offset from its cell centre, share of the side (big objects stay inside their cell)
MAX_TOKENS = 32
PAD = "<pad>"
STYLES = ("shapes", "detail", "video")
SMOOTH_BACKGROUNDS = ("plain", "gradient")  # the background textures of the detail and video styles
HORIZON = 0.6  # share of the height where the detail style's sky meets its wall

DIRECTIONS = ("left", "right", "up", "down")  # the video style's motions
DIRECTION_STEP = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (column, row) step of each direction, in cells
MAX_CLIP_OBJECTS = 2

IMAGE_VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        [PAD, "a", "and", "on", "background", *SIZES, *SHAPES, *OBJECT_TEXTURES, *BACKGROUND_TEXTURES]
        + [*COLOURS, *BACKGROUNDS]
        + [word for cell in CELLS for word in cell.split()]
    )
)
# The video captions' words come last, so the ids (and the embedding tables of weights trained on image captions,
# which hold len(IMAGE_VOCAB) rows) stay as they were.
VOCAB: tuple[str, ...] = tuple(dict.fromkeys([*IMAGE_VOCAB, "moving", *DIRECTIONS]))
WORD_ID = {word: i for i, word in enumerate(VOCAB)}
PAD_ID = WORD_ID[PAD]


@dataclass
class Scenes:
    """Parameters of a batch of B scenes. Per-object tensors are [B, MAX_OBJECTS]; slots >= count are unused."""

    count: torch.Tensor  # [B] objects in the scene, 1..MAX_OBJECTS
    cell: torch.Tensor  # [B, M] grid cell (row-major 3 x 3), distinct within a scene, ascending over drawn slots
    shape: torch.Tensor  # [B, M] index into SHAPES
    colour: torch.Tensor  # [B, M] index into COLOURS
    size: torch.Tensor  # [B, M] index into SIZES
    texture: torch.Tensor  # [B, M] index into OBJECT_TEXTURES
    offset: torch.Tensor  # [B, M, 2] (x, y) offset from the cell centre, share of the side
    background: torch.Tensor  # [B] index into BACKGROUNDS
    background_texture: torch.Tensor  # [B] index into BACKGROUND_TEXTURES
    phase: torch.Tensor  # [B] in [0, 1): phase of the background stripes / checks
    direction: torch.Tensor | None = None  # [B, M] index into DIRECTIONS: the video style's motion (else None)

    def __len__(self) -> int:
        return self.count.shape[0]

    @property
    def present(self) -> torch.Tensor:
        """[B, M] bool: which object slots are drawn."""
        return torch.arange(MAX_OBJECTS, device=self.count.device) < self.count[:, None]

    def _map(self, fn) -> Scenes:
        return Scenes(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)})

    def to(self, device) -> Scenes:
        return self._map(lambda t: t.to(device))

    def __getitem__(self, index) -> Scenes:
        """The scenes selected by ``index`` (a slice, index tensor or bool mask over the batch)."""
        return self._map(lambda t: t[index])


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def sample_scenes(n: int, generator: torch.Generator | None = None, style: str = "shapes") -> Scenes:
    """Draw ``n`` scenes of ``style``; deterministic for a seeded ``generator``, on that generator's device."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_style(style)
    device = generator.device if generator is not None else torch.device("cpu")
    m = MAX_OBJECTS

    def randint(high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=generator, device=device)

    if style == "video":
        count = torch.randint(1, MAX_CLIP_OBJECTS + 1, (n,), generator=generator, device=device)
        cell, direction = _sample_moves(n, generator, device)
    else:
        count = torch.randint(1, m + 1, (n,), generator=generator, device=device)
        cell = torch.rand(n, len(CELLS), generator=generator, device=device).argsort(dim=1)[:, :m]
        # Drawn slots in reading order (the caption's order), unused slots after them.
        drawn = torch.arange(m, device=device) < count[:, None]
        cell = torch.where(drawn, cell, cell + len(CELLS)).sort(dim=1).values % len(CELLS)
        direction = None
    shape = randint(len(SHAPES), (n, m))
    colour = randint(len(COLOURS), (n, m))
    size = randint(len(SIZES), (n, m))
    texture = randint(len(OBJECT_TEXTURES), (n, m))
    offset = (torch.rand(n, m, 2, generator=generator, device=device) * 2 - 1) * JITTER
    background = randint(len(BACKGROUNDS), (n,))
    if style in ("detail", "video"):
        smooth = _table(tuple(BACKGROUND_TEXTURES.index(t) for t in SMOOTH_BACKGROUNDS), device, torch.int64)
        background_texture = smooth[randint(len(SMOOTH_BACKGROUNDS), (n,))]
    else:
        background_texture = randint(len(BACKGROUND_TEXTURES), (n,))
    phase = torch.rand(n, generator=generator, device=device)
    return Scenes(count, cell, shape, colour, size, texture, offset, background, background_texture, phase, direction)


def _compatible(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether moves ``a`` and ``b`` ((start cell, direction) each) keep their centres at least a cell side apart
    along one axis throughout the clip. The Chebyshev distance of two linear paths is convex and piecewise linear in
    time, with its kinks at multiples of 1/2, 1/3 or 1/4 of the clip (unit steps between integer cells), so checking
    the multiples of 1/24 is exact."""
    for k in range(25):
        t = k / 24
        (ca, da), (cb, db) = a, b
        ax, ay = ca % 3 + t * DIRECTION_STEP[da][0], ca // 3 + t * DIRECTION_STEP[da][1]
        bx, by = cb % 3 + t * DIRECTION_STEP[db][0], cb // 3 + t * DIRECTION_STEP[db][1]
        if max(abs(ax - bx), abs(ay - by)) < 1 - 1e-9:
            return False
    return True


# The video style's moves: (start cell, direction) pairs whose end cell is on the grid (24 of 36), and which pairs of
# them two objects of one clip may make.
MOVES = tuple(
    (cell, d)
    for cell in range(len(CELLS))
    for d, (dx, dy) in enumerate(DIRECTION_STEP)
    if 0 <= cell % 3 + dx < 3 and 0 <= cell // 3 + dy < 3
)
COMPATIBLE = tuple(tuple(_compatible(a, b) for b in MOVES) for a in MOVES)


def _sample_moves(n: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Start cells and directions [n, MAX_OBJECTS] of the video style: slots 0 and 1 a compatible pair of moves in
    reading order of their start cells (slot 1 unused in a one-object clip), slot 2 unused on a third cell."""
    moves = _table(MOVES, device, torch.int64)  # [24, 2]
    first = torch.randint(0, len(MOVES), (n,), generator=generator, device=device)
    weights = _table(COMPATIBLE, device)[first]  # [n, 24]: 1.0 where compatible with the first move
    second = torch.multinomial(weights, 1, generator=generator)[:, 0]
    pair = moves[torch.stack([first, second], dim=1)]  # [n, 2, (cell, direction)]
    order = pair[..., 0].argsort(dim=1)
    pair = pair.gather(1, order[..., None].expand(n, 2, 2))
    score = torch.rand(n, len(CELLS), generator=generator, device=device).scatter(1, pair[..., 0], 2.0)
    third = score.argmin(dim=1, keepdim=True)  # a random cell that neither move starts from
    cell = torch.cat([pair[..., 0], third], dim=1)
    direction = torch.cat([pair[..., 1], torch.zeros_like(third)], dim=1)
    return cell, direction


def positions(scenes: Scenes, frames: int) -> torch.Tensor:
    """Object centres [B, M, frames, 2] as (x, y) shares of the side: the cell centre plus the offset, moved at
    constant speed by one cell side in ``scenes.direction`` over the clip (frame f at f / (frames - 1) of the way)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    if scenes.direction is None:
        raise ValueError("positions needs scenes drawn in the video style (scenes.direction is None)")
    dev = scenes.count.device
    centre = _centres(scenes)  # [B, M, 2]
    progress = torch.arange(frames, device=dev, dtype=torch.float32) / (frames - 1)  # [F]
    step = _table(DIRECTION_STEP, dev)[scenes.direction] / 3  # [B, M, 2]
    return centre[:, :, None] + progress[None, None, :, None] * step[:, :, None]


_TABLES: dict[tuple, torch.Tensor] = {}


def _table(values, device, dtype=torch.float32) -> torch.Tensor:
    """A constant lookup table on ``device``, made once: a fresh host-to-GPU copy per batch would wait for the
    GPU's queued work and stall a training loop that generates its data on the fly."""
    key = (tuple(values), str(device), dtype)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = torch.tensor(values, dtype=dtype, device=device)
    return table


RADIUS = {"shapes": SIZE_RADIUS, "detail": DETAIL_RADIUS, "video": VIDEO_RADIUS}  # object radii of each style


def _centres(scenes: Scenes) -> torch.Tensor:
    """Object centres [B, M, 2] at the start: (x, y) shares of the side, the cell centre plus the offset."""
    cell = scenes.cell
    return torch.stack([(cell % 3).float() + 0.5, (cell // 3).float() + 0.5], dim=-1) / 3 + scenes.offset


def render(scenes: Scenes, size: int = 64, style: str = "shapes", frames: int | None = None) -> torch.Tensor:
    """Rasterise ``scenes`` in ``style`` into RGB images [B, 3, size, size] in [-1, 1] (float32, on the scenes'
    device); the video style into clips [B, 3, frames, size, size] (Wan's latent layout [B, C, F, H, W])."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    _check_style(style)
    if style != "video":
        if frames is not None:
            raise ValueError(f"frames applies to the video style only, got frames={frames!r} for style {style!r}")
        return _render(scenes, _centres(scenes), size, style)
    if frames is None or scenes.direction is None:
        raise ValueError("the video style needs frames (an int >= 2) and scenes drawn in the video style")
    path = positions(scenes, frames)  # [B, M, F, 2]
    b = len(scenes)
    per_frame = scenes._map(lambda t: t.repeat_interleave(frames, dim=0))  # row b * F + f: clip b, frame f
    images = _render(per_frame, path.transpose(1, 2).flatten(0, 1), size, style)  # [B * F, 3, S, S]
    return images.view(b, frames, 3, size, size).transpose(1, 2)


def _render(scenes: Scenes, centres: torch.Tensor, size: int, style: str) -> torch.Tensor:
    """Images [B, 3, size, size] of ``scenes`` with their objects at ``centres`` [B, M, 2]."""
    dev, b, s = scenes.count.device, len(scenes), size
    pix = torch.arange(s, device=dev, dtype=torch.float32)
    coord = (pix + 0.5) / s  # pixel centres, share of the side
    smooth = style in ("detail", "video")

    # Background: colour times a texture factor.
    period = max(s // 8, 2)
    shift = (scenes.phase * period).floor()[:, None, None]  # [B, 1, 1]
    rows = pix.view(1, s, 1) + shift
    cols = pix.view(1, 1, s) + shift
    stripes = ((rows // (period // 2)) % 2).expand(b, s, s)
    checks = ((rows // period + cols // period) % 2).expand(b, s, s)
    if smooth:  # sky lightening towards the horizon, over a flat wall
        gradient = torch.where(coord < HORIZON, 0.7 + 0.8 * coord / HORIZON, 0.8)
    else:
        gradient = 0.55 + 0.9 * coord
    factor = torch.stack(
        [torch.ones(b, s, s, device=dev), 1 + 0.7 * stripes, 1 + 0.7 * checks, gradient.view(1, s, 1).expand(b, s, s)],
        dim=1,
    )  # [B, textures, S, S]
    factor = factor.gather(1, scenes.background_texture.view(b, 1, 1, 1).expand(b, 1, s, s))  # [B, 1, S, S]
    base = _table(BACKGROUND_RGB, dev)[scenes.background]  # [B, 3]
    image = (base[:, :, None, None] * factor).clamp(0, 1)

    # Objects: signed distances (share of the side) of the four shapes, picked per slot, anti-aliased over a pixel.
    radius = _table(RADIUS[style], dev)[scenes.size][..., None, None]
    cx, cy = centres[..., 0], centres[..., 1]
    dx = coord.view(1, 1, 1, s) - cx[..., None, None]  # [B, M, 1, S]
    dy = coord.view(1, 1, s, 1) - cy[..., None, None]  # [B, M, S, 1]
    adx, ady = dx.abs(), dy.abs()
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    square = torch.maximum(adx, ady) - 0.82 * radius
    # Upward triangle: apex at dy = -r, base at dy = 0.75 r with half-width r.
    triangle = torch.maximum(dy - 0.75 * radius, (1.75 * adx - (dy + radius)) / math.sqrt(1.75**2 + 1))
    # Cross: two bars of half-length r and half-width 0.4 r.
    arm = 0.4 * radius
    cross = torch.minimum(torch.maximum(adx - radius, ady - arm), torch.maximum(adx - arm, ady - radius))
    sdf = torch.stack(torch.broadcast_tensors(circle, square, triangle, cross), dim=-1)  # [B, M, S, S, 4]
    sdf = sdf.gather(-1, scenes.shape[..., None, None, None].expand(*sdf.shape[:-1], 1))[..., 0]
    alpha = (0.5 - sdf * s).clamp(0, 1) * scenes.present[..., None, None]  # [B, M, S, S]

    if smooth:  # 1-pixel vertical stripes, half as bright
        pattern, depth = (pix % 2).view(1, s).expand(s, s), 0.5
    else:  # broad diagonal stripes
        pattern, depth = ((pix.view(s, 1) + pix.view(1, s)) // max(s // 16, 1)) % 2, 0.4  # [S, S]
    striped = (scenes.texture == OBJECT_TEXTURES.index("striped")).float()[..., None, None]
    shade = 1 - depth * striped * pattern  # [B, M, S, S]
    rgb = _table(COLOUR_RGB, dev)[scenes.colour]  # [B, M, 3]
    for j in range(MAX_OBJECTS):  # later slots are drawn over earlier ones
        a = alpha[:, j, None]
        image = image * (1 - a) + rgb[:, j, :, None, None] * shade[:, j, None] * a
    return image * 2 - 1


def tokens(scenes: Scenes) -> torch.Tensor:
    """Caption token ids [B, MAX_TOKENS] (int64, padded with ``PAD_ID``), built from the parameters on-device (video
    scenes: each object's phrase ends in "moving" and its direction)."""
    dev = scenes.count.device
    present = scenes.present

    def ids(words) -> torch.Tensor:
        return _table(tuple(WORD_ID[w] for w in words), dev, torch.int64)

    def where(mask: torch.Tensor, value) -> torch.Tensor:
        return torch.where(mask, value, PAD_ID)  # Python scalars: no host-to-device copy

    first = ids([cell.split()[0] for cell in CELLS])
    second = ids([cell.split()[1] if " " in cell else PAD for cell in CELLS])
    striped = scenes.texture == OBJECT_TEXTURES.index("striped")
    slots = []
    for j in range(MAX_OBJECTS):
        on = present[:, j]
        words = [
            where(on, WORD_ID["a"]),
            where(on, ids(SIZES)[scenes.size[:, j]]),
            where(on, ids(COLOURS)[scenes.colour[:, j]]),
            where(on & striped[:, j], WORD_ID["striped"]),
            where(on, ids(SHAPES)[scenes.shape[:, j]]),
            where(on, first[scenes.cell[:, j]]),
            where(on, second[scenes.cell[:, j]]),
        ]
        if scenes.direction is not None:  # the video style: "moving <direction>"
            words += [where(on, WORD_ID["moving"]), where(on, ids(DIRECTIONS)[scenes.direction[:, j]])]
        words.append(where(j + 1 < scenes.count, WORD_ID["and"]))
        slots.append(torch.stack(words, dim=1))
    always = torch.ones_like(scenes.count, dtype=torch.bool)
    tail = [
        where(always, WORD_ID["on"]),
        where(always, WORD_ID["a"]),
        ids(BACKGROUND_TEXTURES)[scenes.background_texture],
        ids(BACKGROUNDS)[scenes.background],
        where(always, WORD_ID["background"]),
    ]
    seq = torch.cat([*slots, torch.stack(tail, dim=1)], dim=1)
    # Squeeze out the padding: a stable sort on "is padding" keeps the words in order.
    order = torch.sort((seq == PAD_ID).to(torch.int32), dim=1, stable=True).indices
    seq = seq.gather(1, order)
    out = torch.full((len(scenes), MAX_TOKENS), PAD_ID, dtype=torch.int64, device=dev)
    width = min(seq.shape[1], MAX_TOKENS)
    out[:, :width] = seq[:, :width]
    return out


def phrases(ids: torch.Tensor) -> torch.Tensor:
    """The phrase of each caption token [B, L]: the count of "and" / "on" up to it (object phrases 0 .. count - 1,
    then the background phrase from "on"), capped at ``MAX_OBJECTS``; padding is ``MAX_OBJECTS + 1``."""
    boundary = (ids == WORD_ID["and"]) | (ids == WORD_ID["on"])
    index = boundary.long().cumsum(dim=1).clamp(max=MAX_OBJECTS)
    return torch.where(ids == PAD_ID, MAX_OBJECTS + 1, index)


def decode(ids: torch.Tensor) -> list[str]:
    """Token ids [B, L] -> caption strings (padding dropped)."""
    return [" ".join(VOCAB[i] for i in row if i != PAD_ID) for row in ids.tolist()]


def captions(scenes: Scenes) -> list[str]:
    """The caption of each scene."""
    return decode(tokens(scenes))


def tokenize(texts: list[str], device=None) -> torch.Tensor:
    """Caption strings -> token ids [B, MAX_TOKENS]; an empty string is the unconditional caption (all padding)."""
    out = torch.full((len(texts), MAX_TOKENS), PAD_ID, dtype=torch.int64)
    for row, text in enumerate(texts):
        words = text.split()
        if len(words) > MAX_TOKENS:
            raise ValueError(f"caption {text!r} has {len(words)} words; at most {MAX_TOKENS} are accepted")
        for col, word in enumerate(words):
            if word not in WORD_ID or word == PAD:
                raise ValueError(f"caption word {word!r} is not in the vocabulary; accepted words: {VOCAB[1:]}")
            out[row, col] = WORD_ID[word]
    return out.to(device) if device is not None else out


IGNORE = -100  # target of a classifier head that does not apply (attributes of an empty cell)


def labels(scenes: Scenes) -> dict[str, torch.Tensor]:
    """Classifier targets: per cell [B, 9] ``shape`` (0 = empty, 1 + index into SHAPES), ``colour``, ``size`` and
    ``texture`` (``IGNORE`` for empty cells), and per scene [B] ``background`` and ``background_texture``."""
    b, dev = len(scenes), scenes.count.device
    present = scenes.present
    cells = len(CELLS)
    out = {
        "shape": torch.zeros(b, cells, dtype=torch.int64, device=dev),
        **{k: torch.full((b, cells), IGNORE, dtype=torch.int64, device=dev) for k in ("colour", "size", "texture")},
    }
    for j in range(MAX_OBJECTS):  # cells are distinct within a scene, so unused slots touch only empty cells
        on = present[:, j]
        index = scenes.cell[:, j : j + 1]
        out["shape"].scatter_(1, index, torch.where(on, scenes.shape[:, j] + 1, 0)[:, None])
        for name in ("colour", "size", "texture"):
            value = torch.where(on, getattr(scenes, name)[:, j], IGNORE)
            out[name].scatter_(1, index, value[:, None])
    out["background"] = scenes.background.clone()
    out["background_texture"] = scenes.background_texture.clone()
    return out


HEADS = {  # classifier head -> (classes, per cell?)
    "shape": (1 + len(SHAPES), True),
    "colour": (len(COLOURS), True),
    "size": (len(SIZES), True),
    "texture": (len(OBJECT_TEXTURES), True),
    "background": (len(BACKGROUNDS), False),
    "background_texture": (len(BACKGROUND_TEXTURES), False),
}
