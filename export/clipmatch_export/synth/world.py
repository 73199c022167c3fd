"""Scenes of coloured shapes on a 64x64 canvas, and the renderer that draws them.

A scene is a handful of objects (shape, colour, size, centre) on a light
background. Entities are objects that also carry a pattern in a second colour
and a small mark, two things no plain object ever has. Rendering is plain
numpy on cached masks, so 10,000 images take a second or two on one core, and
it is deterministic: the same scene gives the same bytes.

Every multi-object scene is laid out on one line (a row or a column), so any
two objects stand in exactly one clear relation: left/right for a row,
above/below for a column. That keeps "A left of B" checkable on every image
of a gallery, not only on the one it was drawn for.

    >>> scene = Scene((Obj("circle", "red", "big", 20, 32), Obj("square", "blue", "small", 44, 31)),
    ...               background=(230, 228, 225), seed=1)
    >>> render(scene).shape, relation(*scene.objects)
    ((64, 64, 3), 'left')
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CANVAS", "SHAPES", "COLOURS", "SIZES", "RADIUS", "PATTERNS", "MARKS", "RELATIONS",
    "MIN_SEPARATION", "MAX_OFFSET", "HELD_OUT_COMBOS",
    "Obj", "Scene", "render", "relation", "holds", "random_background",
    "place_single", "place_line", "scene_to_json", "scene_from_json",
]

CANVAS = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Far apart in RGB and all darker than the background in at least one channel,
# so a colour never melts into the canvas; yellow/orange is the closest pair.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 20),
    "purple": (140, 45, 185),
    "orange": (250, 125, 0),
}
SIZES = ("small", "big")
# Half-widths in pixels: an object covers (2r+1)^2. Big is wide enough for a
# pattern with a few periods; two bigs and a small still fit on one line.
RADIUS = {"small": 6, "big": 10}
PATTERNS = ("stripes", "dots", "checks")
MARKS = ("white dot", "black notch", "black rim")
RELATIONS = ("left", "right", "above", "below")

# A relation holds when the centres are this far apart along its axis ...
MIN_SEPARATION = 12
# ... and at most this far apart across it. Layouts jitter by 2 px per object,
# so every pair placed on a line is far inside these bounds.
MAX_OFFSET = 6
_JITTER = 2
_GAP = 2  # free pixels between neighbouring objects on a line
_MARGIN = 1  # free pixels between an object and the canvas edge

_NOISE_STD = 3.0  # mild pixel noise, in 0-255 units
_SUPERSAMPLE = 4  # masks are drawn 4x larger and averaged down, for clean edges

# (colour, shape) pairs that train and val never render or mention; test does.
# One per shape and each with its own colour, so every word stays seen in
# training through the other combinations. Fixed by a seed: never change it,
# or trained models stop being comparable.
_HELD_OUT_SEED = 20250611


def _pick_held_out_combos() -> frozenset[tuple[str, str]]:
    rng = np.random.default_rng(_HELD_OUT_SEED)
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    return frozenset(zip(colours, SHAPES))


HELD_OUT_COMBOS: frozenset[tuple[str, str]] = _pick_held_out_combos()


@dataclass(frozen=True)
class Obj:
    """One object. (x, y) is the centre in canvas pixels, y growing downwards.

    Plain objects leave pattern, pattern_colour, mark and entity as None;
    entities set all four (see ``entities.Entity.obj``).
    """

    shape: str
    colour: str
    size: str
    x: int
    y: int
    pattern: str | None = None
    pattern_colour: str | None = None
    mark: str | None = None
    entity: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour {self.colour!r} is not one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {SIZES}")
        if self.pattern is not None and self.pattern not in PATTERNS:
            raise ValueError(f"pattern {self.pattern!r} is not one of {PATTERNS}")
        if (self.pattern is None) != (self.pattern_colour is None):
            raise ValueError(f"pattern {self.pattern!r} and pattern_colour {self.pattern_colour!r} go together")
        if self.pattern_colour is not None and self.pattern_colour not in COLOURS:
            raise ValueError(f"pattern_colour {self.pattern_colour!r} is not one of {tuple(COLOURS)}")
        if self.mark is not None and self.mark not in MARKS:
            raise ValueError(f"mark {self.mark!r} is not one of {MARKS}")
        r = self.radius
        if not (_MARGIN + r <= self.x < CANVAS - _MARGIN - r and _MARGIN + r <= self.y < CANVAS - _MARGIN - r):
            raise ValueError(f"{self.size} {self.shape} at ({self.x}, {self.y}) does not fit the {CANVAS}px canvas")

    @property
    def radius(self) -> int:
        return RADIUS[self.size]

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Objects on a background. ``seed`` drives the background gradient, the
    clutter and the pixel noise, so two scenes that differ only in their
    objects (a hard-negative image) share every other pixel."""

    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    seed: int

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1 to 3 objects, got {len(self.objects)}")
        for i, a in enumerate(self.objects):
            for b in self.objects[i + 1:]:
                # Boxes must not touch: along x or along y they are apart.
                if abs(a.x - b.x) <= a.radius + b.radius and abs(a.y - b.y) <= a.radius + b.radius:
                    raise ValueError(f"objects at ({a.x}, {a.y}) and ({b.x}, {b.y}) overlap")


# --- relations ---------------------------------------------------------------

def relation(a: Obj, b: Obj) -> str | None:
    """The one relation "a <rel> b" that holds, or None when the pair is diagonal or close.

    >>> relation(Obj("star", "red", "small", 10, 40), Obj("cross", "green", "small", 10, 20))
    'below'
    """
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dy) <= MAX_OFFSET and abs(dx) >= MIN_SEPARATION:
        return "left" if dx > 0 else "right"
    if abs(dx) <= MAX_OFFSET and abs(dy) >= MIN_SEPARATION:
        return "above" if dy > 0 else "below"
    return None


def holds(a: Obj, rel: str, b: Obj) -> bool:
    """Whether "a <rel> b" is true.

    >>> holds(Obj("star", "red", "small", 10, 20), "left", Obj("cross", "green", "small", 40, 22))
    True
    """
    if rel not in RELATIONS:
        raise ValueError(f"relation {rel!r} is not one of {RELATIONS}")
    return relation(a, b) == rel


# --- layouts -----------------------------------------------------------------

def random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, slightly tinted background colour.

    >>> all(214 <= c <= 242 for c in random_background(np.random.default_rng(0)))
    True
    """
    return tuple(int(c) for c in rng.integers(214, 243, size=3))


def place_single(rng: np.random.Generator, size: str) -> tuple[int, int]:
    """A random centre where one object of this size fits.

    >>> place_single(np.random.default_rng(0), "big")[0] in range(11, 53)
    True
    """
    r = RADIUS[size]
    lo, hi = _MARGIN + r, CANVAS - _MARGIN - r  # hi exclusive
    return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


def place_line(rng: np.random.Generator, sizes: Sequence[str], axis: str) -> list[tuple[int, int]] | None:
    """Centres for objects in a row ("horizontal", left to right) or a column
    ("vertical", top to bottom), in the order given; None when they do not fit.

    >>> xy = place_line(np.random.default_rng(0), ["big", "small"], "horizontal")
    >>> xy[1][0] - xy[0][0] >= MIN_SEPARATION, abs(xy[1][1] - xy[0][1]) <= 2 * 2
    (True, True)
    """
    if axis not in ("horizontal", "vertical"):
        raise ValueError(f"axis {axis!r} is not 'horizontal' or 'vertical'")
    radii = [RADIUS[s] for s in sizes]
    span = CANVAS - 2 * _MARGIN
    need = sum(2 * r + 1 for r in radii) + _GAP * (len(radii) - 1)
    slack = span - need
    if slack < 0:
        return None
    # Spread the slack over the k+1 gaps (before, between, after) at random.
    cuts = np.sort(rng.integers(0, slack + 1, size=len(radii)))
    extra = np.diff(np.concatenate([[0], cuts]))  # (k,) extra space before each object
    along, pos = [], _MARGIN
    for r, e in zip(radii, extra):
        pos += int(e)
        along.append(pos + r)
        pos += 2 * r + 1 + _GAP
    # The shared cross coordinate keeps the widest object (plus jitter) inside.
    rmax = max(radii) + _JITTER
    line = int(rng.integers(_MARGIN + rmax, CANVAS - _MARGIN - rmax))
    across = [line + int(j) for j in rng.integers(-_JITTER, _JITTER + 1, size=len(radii))]
    if axis == "horizontal":
        return list(zip(along, across))
    return list(zip(across, along))


# --- masks ---------------------------------------------------------------------

def _polygon_star(c: float, outer: float, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = outer if k % 2 == 0 else inner
        ang = -np.pi / 2 + k * np.pi / 5
        pts.append((c + rad * np.cos(ang), c + 0.08 * outer + rad * np.sin(ang)))
    return pts


@functools.cache
def _shape_mask(shape: str, radius: int) -> np.ndarray:
    d = 2 * radius + 1
    s = d * _SUPERSAMPLE
    img = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(img)
    c, e = (s - 1) / 2, s - 1
    if shape == "circle":
        draw.ellipse([0, 0, e, e], fill=255)
    elif shape == "square":
        # A little inset: a full-box square would outweigh every other shape.
        i = 0.08 * s
        draw.rectangle([i, i, e - i, e - i], fill=255)
    elif shape == "triangle":
        draw.polygon([(c, 0), (e, e), (0, e)], fill=255)
    elif shape == "star":
        # A fat inner radius so the small star still reads as a star.
        draw.polygon(_polygon_star(c, s / 2, 0.47 * s / 2), fill=255)
    elif shape == "cross":
        t = 0.19 * s  # half the arm width
        draw.rectangle([c - t, 0, c + t, e], fill=255)
        draw.rectangle([0, c - t, e, c + t], fill=255)
    else:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    a = np.asarray(img, dtype=np.float32).reshape(d, _SUPERSAMPLE, d, _SUPERSAMPLE).mean(axis=(1, 3))
    return a >= 127.5  # (d, d) bool


def _pattern_mask(pattern: str, d: int) -> np.ndarray:
    # Phase anchored on the centre, so thin shapes (the star) still catch the
    # central dot or stripe.
    i, j = np.indices((d, d)) - d // 2 + 100
    if pattern == "stripes":
        return (i + j) % 5 < 2  # diagonal, 2 px on 3 off: unlike any edge of a shape
    if pattern == "dots":
        return (i % 5 <= 1) & (j % 5 <= 1)  # 2x2 dots every 5 px
    if pattern == "checks":
        return ((i // 3) + (j // 3)) % 2 == 0
    raise ValueError(f"pattern {pattern!r} is not one of {PATTERNS}")


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _mark_mask(mark: str, shape_mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    d = shape_mask.shape[0]
    r = d // 2
    i, j = np.indices((d, d))
    if mark == "white dot":
        return ((i - r) ** 2 + (j - r) ** 2 <= 5) & shape_mask, (255, 255, 255)
    if mark == "black notch":
        # A slit from the top edge down towards the centre: every shape has top there.
        return (np.abs(j - r) <= 1) & (i <= 0.55 * r) & shape_mask, (20, 20, 20)
    if mark == "black rim":
        return shape_mask & ~_erode(shape_mask), (20, 20, 20)
    raise ValueError(f"mark {mark!r} is not one of {MARKS}")


@functools.cache
def _layers(shape: str, size: str, colour: str, pattern: str | None, pattern_colour: str | None,
            mark: str | None) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    # Each layer is (mask (d, d) bool, rgb (3,) float32), painted in order.
    body = _shape_mask(shape, RADIUS[size])
    out = [(body, np.array(COLOURS[colour], np.float32))]
    if pattern is not None:
        # The pattern stays off the outermost pixel ring, so the silhouette
        # shows the body colour: checks in blue on orange never pass for
        # checks in orange on blue.
        inner = _erode(body) & _pattern_mask(pattern, body.shape[0])
        out.append((inner, np.array(COLOURS[pattern_colour], np.float32)))
    if mark is not None:
        m, rgb = _mark_mask(mark, body)
        out.append((m, np.array(rgb, np.float32)))
    return tuple(out)


_YY, _XX = np.indices((CANVAS, CANVAS), dtype=np.float32)


def render(scene: Scene, size: int = CANVAS, *, noise: float = _NOISE_STD, clutter: bool = True) -> np.ndarray:
    """Draw a scene: uint8 RGB array (size, size, 3). Same scene, same bytes.

    >>> s = Scene((Obj("star", "yellow", "big", 32, 32),), (228, 230, 232), seed=3)
    >>> a = render(s); a.dtype, a.shape, bool((a == render(s)).all())
    (dtype('uint8'), (64, 64, 3), True)
    """
    rng = np.random.default_rng(scene.seed)
    # Every random draw happens whatever the options, so turning clutter off
    # leaves the noise of the same scene unchanged.
    angle = rng.uniform(0, 2 * np.pi)
    tint = rng.uniform(-6, 6, size=3).astype(np.float32)
    n_specks = int(rng.integers(0, 4))
    specks = rng.integers(0, CANVAS - 1, size=(n_specks, 2))
    speck_grey = rng.integers(120, 175, size=n_specks)
    speck_big = rng.random(n_specks) < 0.5
    grain = rng.standard_normal((CANVAS, CANVAS, 3), dtype=np.float32)

    ramp = (np.cos(angle) * (_XX - 31.5) + np.sin(angle) * (_YY - 31.5)) / 32.0  # (64, 64) in about [-1.4, 1.4]
    img = np.asarray(scene.background, np.float32) + ramp[..., None] * tint  # (64, 64, 3)
    if clutter:
        for (y, x), g, big in zip(specks, speck_grey, speck_big):
            w = 2 if big else 1
            img[y:y + w, x:x + w] = g
    for o in scene.objects:
        r = o.radius
        patch = img[o.y - r:o.y + r + 1, o.x - r:o.x + r + 1]  # a view: painting it paints img
        for mask, rgb in _layers(o.shape, o.size, o.colour, o.pattern, o.pattern_colour, o.mark):
            patch[mask] = rgb
    if noise:
        img += grain * noise
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if size != CANVAS:
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.BILINEAR))
    return out


# --- JSON ----------------------------------------------------------------------

def scene_to_json(scene: Scene) -> dict:
    """A scene as plain JSON types; ``scene_from_json`` reads it back.

    >>> s = Scene((Obj("cross", "green", "small", 9, 9),), (220, 221, 222), 5)
    >>> scene_from_json(scene_to_json(s)) == s
    True
    """
    objs = []
    for o in scene.objects:
        d = {"shape": o.shape, "colour": o.colour, "size": o.size, "x": o.x, "y": o.y}
        if o.pattern is not None or o.mark is not None or o.entity is not None:
            d.update(pattern=o.pattern, pattern_colour=o.pattern_colour, mark=o.mark, entity=o.entity)
        objs.append(d)
    return {"objects": objs, "background": list(scene.background), "seed": scene.seed}


def scene_from_json(d: dict) -> Scene:
    """Inverse of ``scene_to_json``.

    >>> scene_from_json({"objects": [{"shape": "star", "colour": "red", "size": "big", "x": 30, "y": 30}],
    ...                  "background": [230, 230, 230], "seed": 0}).objects[0].shape
    'star'
    """
    return Scene(tuple(Obj(**o) for o in d["objects"]), tuple(d["background"]), int(d["seed"]))
