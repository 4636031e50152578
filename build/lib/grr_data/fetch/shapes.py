"""The synthetic `shapes` set: coloured shapes on varied backgrounds with compositional captions.

A small model learns it on a CPU in minutes, so a demo can end with readable captions, and because
position decides its captions ("a small red circle to the left of a large blue square") it is a
small testbed for position encodings. Everything it varies (colours, shapes, sizes, counts,
relations, held-out combinations, split fractions) is in `manifests/shapes.json`.

Pair i is drawn from its own random stream (seed, i), so any number of pairs can be made and a
larger set extends a smaller one. A caption is a function of its image: two objects are named left
to right (or top to bottom), one relation per axis, so an exact-match score is meaningful. train and
val show only the seen colour-shape combinations; every test image shows at least one held-out one.
The images go through the same PairWriter as every converted source (288-px JPEG, one pair per image).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from grr_data.fetch.common import WORK_DIR, FetchError, FetchOptions, FetchReport
from grr_data.fetch.convert import PairWriter, SourceImage
from grr_data.fetch.shapes_tokenizer import write_shapes_tokenizer
from grr_data.infra.files import write_json_atomic
from grr_data.infra.progress import progress

DEFAULT_NUM_PAIRS = 2000
SUPERSAMPLE = 2  # drawn at twice the size and reduced: smooth edges without a blur
MARGIN = 0.02  # of the side, kept free at the image border
PARAMS_FILE = "shapes.json"  # in OUT/_work: what the folder was generated with


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str  # a size word of the manifest
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the side


@dataclass(frozen=True)
class Scene:
    index: int
    split: str
    kind: str  # one | two | count
    things: tuple[Thing, ...]  # in the order the caption names them
    axis: str | None  # two: horizontal | vertical
    count_word: str | None
    caption: str
    unseen: bool  # shows a held-out colour-shape combination


class ShapesSpec:
    """The manifest's vocabulary and rules, checked once."""

    def __init__(self, manifest: dict):
        try:
            self.colours = {name: tuple(rgb) for name, rgb in manifest["colours"].items()}
            self.plurals = dict(manifest["shapes"])
            self.sizes = {name: tuple(r) for name, r in manifest["sizes"].items()}
            self.counts = dict(manifest["counts"])
            self.relations = dict(manifest["relations"])
            self.held_out = {tuple(pair) for pair in manifest["held_out"]}
            self.weights = dict(manifest["scene_weights"])
            self.templates = dict(manifest["captions"])
            self.fractions = dict(manifest["split_fractions"])
            self.side = int(manifest["image_side"])
        except (KeyError, TypeError, ValueError) as err:
            raise FetchError(f"manifests/shapes.json: malformed ({err!r}); restore it from the repository") from err
        self.shapes = list(self.plurals)
        pairs = [(c, s) for c in self.colours for s in self.shapes]
        self.seen = [p for p in pairs if p not in self.held_out]
        self.unseen = sorted(self.held_out)
        if not self.seen or not self.unseen or not set(self.unseen) <= set(pairs):
            raise FetchError("manifests/shapes.json: held_out must be some, not all, of its colour-shape pairs")

    def words(self) -> set[str]:
        """Every word a caption can use."""
        words = set(self.colours) | set(self.shapes) | set(self.plurals.values()) | set(self.sizes)
        words |= set(self.counts) | {w for r in self.relations.values() for w in r.split()}
        for template in self.templates.values():
            words |= {w for w in template.split() if not w.startswith("{")}
        return words


def _split_of(rng: np.random.Generator, fractions: dict[str, float]) -> str:
    u, edge = rng.random(), 0.0
    for split in ("val", "test"):
        edge += fractions.get(split, 0.0)
        if u < edge:
            return split
    return "train"


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _pairs_for(rng: np.random.Generator, spec: ShapesSpec, split: str, n: int) -> list[tuple[str, str]]:
    """n colour-shape pairs: seen ones for train and val; for test at least one held-out one."""
    if split != "test":
        return [_pick(rng, spec.seen) for _ in range(n)]
    pairs = [_pick(rng, spec.seen + spec.unseen) for _ in range(n)]
    pairs[int(rng.integers(n))] = _pick(rng, spec.unseen)
    return pairs


def _side(rng: np.random.Generator, spec: ShapesSpec, size: str) -> float:
    low, high = spec.sizes[size]
    return float(rng.uniform(low, high))


def _place_two(rng: np.random.Generator, sides: list[float], axis: str) -> list[tuple[float, float]]:
    """Top-left corners of two objects, the first wholly left of (or above) the second, aligned on
    the other axis within a few percent, so the relation is never in doubt."""
    a, b = sides
    gap = float(rng.uniform(0.03, 0.12))
    along0 = float(rng.uniform(MARGIN, 1 - MARGIN - a - gap - b))
    along1 = float(rng.uniform(along0 + a + gap, 1 - MARGIN - b))
    centre = float(rng.uniform(MARGIN + max(a, b) / 2, 1 - MARGIN - max(a, b) / 2))
    across = [centre - s / 2 + float(rng.uniform(-0.02, 0.02)) for s in sides]
    across = [min(max(c, MARGIN), 1 - MARGIN - s) for c, s in zip(across, sides, strict=True)]
    if axis == "horizontal":
        return [(along0, across[0]), (along1, across[1])]
    return [(across[0], along0), (across[1], along1)]


def _place_in_cells(rng: np.random.Generator, sides: list[float]) -> list[tuple[float, float]]:
    """Top-left corners in distinct cells of a grid (3x3, or 2x2 for objects too large for a third
    of the side), jittered inside the cell: never overlapping."""
    grid = 3 if max(sides) <= 1 / 3 - MARGIN else 2
    if len(sides) > grid * grid:
        raise FetchError(f"manifests/shapes.json: {len(sides)} objects of side {max(sides):.2f} do not fit; "
                         "lower the largest count or size")
    cells = rng.permutation(grid * grid)[: len(sides)]
    corners = []
    for cell, s in zip(cells, sides, strict=True):
        row, col = divmod(int(cell), grid)
        lo_x, lo_y = max(col / grid, MARGIN), max(row / grid, MARGIN)
        hi_x, hi_y = min((col + 1) / grid, 1 - MARGIN) - s, min((row + 1) / grid, 1 - MARGIN) - s
        corners.append((float(rng.uniform(lo_x, max(lo_x, hi_x))), float(rng.uniform(lo_y, max(lo_y, hi_y)))))
    return corners


def make_scene(spec: ShapesSpec, seed: int, index: int) -> Scene:
    """Pair `index` of the set drawn from `seed`: its split, objects and caption (no pixels yet)."""
    rng = np.random.default_rng([seed, index])
    split = _split_of(rng, spec.fractions)
    kinds = list(spec.weights)
    kind = kinds[int(rng.choice(len(kinds), p=np.array(list(spec.weights.values())) / sum(spec.weights.values())))]
    sizes = list(spec.sizes)
    axis = count_word = None
    if kind == "one":
        (pair,) = _pairs_for(rng, spec, split, 1)
        size = _pick(rng, sizes)
        s = _side(rng, spec, size)
        corner = (float(rng.uniform(MARGIN, 1 - MARGIN - s)), float(rng.uniform(MARGIN, 1 - MARGIN - s)))
        placed = [(pair, size, s, corner)]
        caption = spec.templates["one"].format(size=size, colour=pair[0], shape=pair[1])
    elif kind == "two":
        pairs = _pairs_for(rng, spec, split, 2)
        chosen = [_pick(rng, sizes) for _ in pairs]
        sides = [_side(rng, spec, size) for size in chosen]
        axis = _pick(rng, list(spec.relations))
        corners = _place_two(rng, sides, axis)
        placed = list(zip(pairs, chosen, sides, corners, strict=True))
        (c1, s1), (c2, s2) = pairs
        caption = spec.templates["two"].format(size=chosen[0], colour=c1, shape=s1, relation=spec.relations[axis],
                                               size2=chosen[1], colour2=c2, shape2=s2)
    else:
        (pair,) = _pairs_for(rng, spec, split, 1)
        count_word = _pick(rng, list(spec.counts))
        size = _pick(rng, sizes)
        sides = [_side(rng, spec, size) for _ in range(spec.counts[count_word])]
        placed = [(pair, size, s, c) for s, c in zip(sides, _place_in_cells(rng, sides), strict=True)]
        caption = spec.templates["count"].format(count=count_word, size=size, colour=pair[0],
                                                 shapes=spec.plurals[pair[1]])
    things = tuple(Thing(shape=p[1], colour=p[0], size=size, box=(x, y, x + s, y + s))
                   for p, size, s, (x, y) in placed)
    unseen = any((t.colour, t.shape) in spec.held_out for t in things)
    return Scene(index, split, kind, things, axis, count_word, caption, unseen)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n, 3) uint8: a dull colour, flat, a gradient, fine noise or faint stripes; never as
    saturated as the shapes, so a colour word always means the shape."""
    def dull() -> np.ndarray:
        grey = rng.uniform(60, 210)
        return np.clip(grey + rng.uniform(-15, 15, size=3), 0, 255)

    style = int(rng.integers(4))
    image = np.broadcast_to(dull(), (n, n, 3)).astype(np.float32)
    if style == 1:  # linear gradient to a second dull colour
        angle = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:n, 0:n] / n
        t = (np.cos(angle) * x + np.sin(angle) * y)
        t = ((t - t.min()) / (np.ptp(t) or 1))[..., None]
        image = image * (1 - t) + dull() * t
    elif style == 2:
        image = image + rng.normal(0, rng.uniform(4, 12), size=(n, n, 1))
    elif style == 3:  # stripes or checks at low contrast
        period = rng.uniform(0.05, 0.15) * n
        y, x = np.mgrid[0:n, 0:n]
        wave = np.sin(2 * math.pi * x / period) * (np.sin(2 * math.pi * y / period) if rng.random() < 0.5 else 1)
        image = image + (rng.uniform(6, 16) * wave)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """Polygon of `shape` inside `box` (pixels); None for the circle (drawn as an ellipse)."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.42 * r) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else 0.42 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t), (cx + t, cy + t),
                (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    if shape == "circle":
        return None
    raise FetchError(f"manifests/shapes.json: no drawing for shape {shape!r} (known: circle, square, "
                     "triangle, star, cross)")


def render(spec: ShapesSpec, scene: Scene, seed: int) -> Image.Image:
    """The scene as a `spec.side`-pixel square RGB image; pixels depend only on (seed, index)."""
    rng = np.random.default_rng([seed, scene.index, 1])  # its own stream: drawing never moves a caption
    n = spec.side * SUPERSAMPLE
    # the background at the final size (4x cheaper), enlarged so the reduction gives it back unchanged
    image = Image.fromarray(_background(rng, spec.side)).resize((n, n), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        rgb = tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in spec.colours[thing.colour])
        box = tuple(v * n for v in thing.box)
        outline = _outline(thing.shape, box)
        if outline is None:
            draw.ellipse(box, fill=rgb)
        else:
            draw.polygon(outline, fill=rgb)
    return image.resize((spec.side, spec.side), Image.Resampling.BOX)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _scene_json(scene: Scene) -> str:
    return json.dumps({"kind": scene.kind, "axis": scene.axis, "count": scene.count_word,
                       "objects": [{"shape": t.shape, "colour": t.colour, "size": t.size,
                                    "box": [round(v, 4) for v in t.box]} for t in scene.things]})


def _check_params(options: FetchOptions, params: dict) -> None:
    path = Path(options.out) / WORK_DIR / PARAMS_FILE
    if path.exists():
        before = json.loads(path.read_text())
        if before != params:
            raise FetchError(f"{options.out} holds shapes made with --num-pairs {before['num_pairs']} --seed "
                             f"{before['seed']}; delete the folder or choose another --out")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, params)


def resolve_params(options: FetchOptions) -> dict:
    num_pairs = DEFAULT_NUM_PAIRS if options.num_pairs is None else options.num_pairs
    seed = 0 if options.seed is None else options.seed
    if num_pairs < 1:
        raise FetchError(f"--num-pairs {num_pairs}: give at least 1")
    if seed < 0:
        raise FetchError(f"--seed {seed}: give a seed of 0 or more")
    return {"num_pairs": num_pairs, "seed": seed}


def check_options(options: FetchOptions) -> None:
    """Refuse to add to (or call complete) a folder generated with other parameters."""
    _check_params(options, resolve_params(options))


def fetch(options: FetchOptions) -> dict:
    params = resolve_params(options)
    _check_params(options, params)
    out = Path(options.out)
    report = FetchReport("shapes", options)
    spec = ShapesSpec(report.manifest)
    seed = params["seed"]
    scenes = [make_scene(spec, seed, i) for i in range(params["num_pairs"])]
    splits = ("train", "val", "test")
    with progress(total=len(scenes), desc="pairs", unit="pair") as bar:
        writers = {s: PairWriter(out / s, options.shard_size, bar.update) for s in splits}
        for scene in scenes:
            writers[scene.split].add(SourceImage(
                image_id=f"shapes-{seed}-{scene.index:07d}", captions=[scene.caption],
                source=f"grr-shapes:seed={seed}/index={scene.index}",
                read=lambda scene=scene: _png(render(spec, scene, seed)),
                extra={"source_split": scene.split, "combination": "unseen" if scene.unseen else "seen",
                       "scene": _scene_json(scene)}))
        for writer in writers.values():
            writer.close()
    for split in splits:
        report.add_split(split, out / split)
    report.sources.append({"generator": "grr_data.fetch.shapes", **params})
    report.tool = {"name": "grr shapes generator (Pillow, numpy)", **params}
    tokenizer = write_shapes_tokenizer(spec, out)
    report.extra["shapes"] = {**params, "held_out": [list(p) for p in spec.unseen],
                              "combinations": {"train": "seen", "val": "seen", "test": "unseen"},
                              "tokenizer": tokenizer.name}
    return report.finish()
