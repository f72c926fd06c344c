"""ShapesWorld: a seeded synthetic image world with COCO-like annotations (the demo's data).

Every image is a pure function of one integer *image seed* (numpy + PIL only, no global state),
so a dataset is a range of seeds. Each split owns a disjoint seed range (`SPLIT_RANGES`), and
`image_seeds(split, n, seed)` takes block `seed` of `SEED_BLOCK` consecutive seeds inside it:
held-out ("val"/"test") images can never be training images, whatever `n` and `seed` are.

Objects (1-4; uniformly many unless `object_counts` weighs them) have a shape, a named color, a
size and a position: each sits at a jittered place inside its own cell of a 4 x 4 layout grid, so
objects never overlap or touch, and an object lies inside one cell of a vision tower whose patches
tile the image 4 x 4 (the demo's: what each image token holds is then one object or nothing, as an
object detector's anchors would see it). Colors and sizes come from small priors that are mildly
skewed and correlated inside a scene (objects often share a color or a shape), so "popular" and
"co-occurring" objects exist, as in COCO, which POPE's popular/adversarial negatives rely on.
Backgrounds are light, low-saturation colors (plain, gradient or noisy) that never come near the
saturated object palette.
"""

import colorsys
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.errors import LlavaJaxError

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # saturated (or black): far from every light, desaturated background
    "red": (220, 30, 30),
    "orange": (245, 135, 0),
    "yellow": (235, 205, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 225),
    "purple": (140, 45, 185),
    "black": (25, 25, 25),
}
SIZES = ("small", "large")
BACKGROUNDS = {"plain": "a plain light background", "gradient": "a soft gradient background",
               "noisy": "a lightly speckled background"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

SEED_BLOCK = 1_000_000  # image seeds per (split, seed) block
SPLIT_RANGES = {  # disjoint by construction; 1000 blocks each
    "train": range(0, 1000 * SEED_BLOCK),
    "val": range(1000 * SEED_BLOCK, 2000 * SEED_BLOCK),
    "test": range(2000 * SEED_BLOCK, 3000 * SEED_BLOCK),
}

# Mildly skewed priors: a few colors/shapes are "popular" (for POPE's popular split).
_COLOR_P = np.linspace(1.0, 0.6, len(COLORS)) / np.linspace(1.0, 0.6, len(COLORS)).sum()
_SHAPE_P = np.linspace(1.0, 0.7, len(SHAPES)) / np.linspace(1.0, 0.7, len(SHAPES)).sum()
LAYOUT_GRID = 4  # objects occupy distinct cells of a LAYOUT_GRID x LAYOUT_GRID grid
# Object side as a fraction of its cell: smaller objects' shapes are at the limit of what the
# demo's 24-px patch embedding reads.
_SIDE = {"small": (0.62, 0.72), "large": (0.8, 0.92)}
_SS = 2  # supersampling factor: draw at 2x, box-filter down = antialiased edges


def image_seeds(split: str, n: int, seed: int = 0) -> range:
  """The image seeds of `n` images of `split`, block `seed` (0 <= seed < 1000)."""
  if split not in SPLIT_RANGES:
    raise LlavaJaxError(f"shapes: unknown split {split!r}; expected one of {sorted(SPLIT_RANGES)}")
  if not 0 <= seed < len(SPLIT_RANGES[split]) // SEED_BLOCK:
    raise LlavaJaxError(f"shapes: seed {seed} out of range [0, 1000)")
  if not 0 <= n <= SEED_BLOCK:
    raise LlavaJaxError(f"shapes: n={n} out of range [0, {SEED_BLOCK}]")
  start = SPLIT_RANGES[split].start + seed * SEED_BLOCK
  return range(start, start + n)


def join_words(items: list[str]) -> str:
  """'a', 'a and b', 'a, b and c'."""
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pastel(rng) -> np.ndarray:
  h, s, v = rng.random(), rng.uniform(0.03, 0.2), rng.uniform(0.86, 0.98)
  return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255


def _background(rng, px: int) -> tuple[str, np.ndarray]:
  kind = ("plain", "gradient", "noisy")[rng.integers(3)]
  img = np.broadcast_to(_pastel(rng).astype(np.float32), (px, px, 3))
  if kind == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * np.arange(px)[None, :] + np.sin(angle) * np.arange(px)[:, None]
    t = ((ramp - ramp.min()) / (np.ptp(ramp) + 1e-6))[..., None].astype(np.float32)
    img = img * (1 - t) + _pastel(rng).astype(np.float32) * t
  elif kind == "noisy":
    img = img + rng.normal(0, 6, img.shape).astype(np.float32)
  return kind, np.clip(img, 0, 255).astype(np.uint8)


def _object_count(rng, object_counts) -> int:
  """1-4: uniform (the default draw, which fixed seeds' images rely on), or weighted by
  `object_counts` (the probabilities of 1, 2, 3 and 4 objects)."""
  if object_counts is None:
    return int(rng.integers(1, 5))
  weights = np.asarray(object_counts, np.float64)
  if weights.shape != (4,) or weights.min() < 0 or not math.isclose(weights.sum(), 1.0):
    raise LlavaJaxError(f"shapes: object_counts {tuple(object_counts)}: expected 4 probabilities (1-4 objects) summing to 1")
  return 1 + int(rng.choice(4, p=weights))


def _sample_objects(rng, size: int, object_counts=None) -> list[dict]:
  """Attributes and places of 1-4 objects, each inside its own (random) layout cell."""
  objects, cell = [], size / LAYOUT_GRID
  for k in rng.permutation(LAYOUT_GRID ** 2)[:_object_count(rng, object_counts)]:
    color = list(COLORS)[rng.choice(len(COLORS), p=_COLOR_P)]
    shape = SHAPES[rng.choice(len(SHAPES), p=_SHAPE_P)]
    u = rng.random()
    if objects and u < 0.3:  # correlated scenes: share a color or a shape with an earlier object
      color = objects[rng.integers(len(objects))]["color"]
    elif objects and u < 0.6:
      shape = objects[rng.integers(len(objects))]["shape"]
    obj_size = SIZES[rng.integers(2)]
    side = cell * rng.uniform(*_SIDE[obj_size])
    row, col = divmod(int(k), LAYOUT_GRID)
    # Half a pixel of margin inside the cell: neighbors' boxes never touch.
    x, y = np.array([col, row]) * cell + rng.uniform(0.5, max(0.6, cell - side - 0.5), 2)
    rgb = np.clip(np.add(COLORS[color], rng.integers(-12, 13, 3)), 0, 255)  # slight jitter
    objects.append({"shape": shape, "color": color, "size": obj_size, "_cell": (x, y, side), "_rgb": rgb})
  return objects


def _outline(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]]:
  """Polygon vertices (circle: its bounding corners) of a shape filling the cell (x, y, s)."""
  if shape in ("circle", "square"):
    return [(x, y), (x + s, y + s)]
  if shape == "triangle":
    return [(x + s / 2, y), (x + s, y + s), (x, y + s)]
  r, cx = s / 2, x + s / 2
  cy = y + r + (r - r * math.cos(math.pi / 5)) / 2  # centers the star's height in the cell
  return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
           cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]


def render(image_seed: int, size: int = 64, object_counts=None) -> tuple[Image.Image, dict]:
  """One image and its annotation (without the "image" path) from one image seed (and the
  object-count weights, see `_object_count`)."""
  if not 32 <= size <= 256:
    raise LlavaJaxError(f"shapes: image size {size} out of range [32, 256] (48-96 recommended)")
  rng = np.random.default_rng(image_seed)
  objects = _sample_objects(rng, size, object_counts)
  kind, bg = _background(rng, size)  # at 1x: 4x cheaper, and smooth anyway
  canvas = Image.fromarray(bg).resize((size * _SS,) * 2, Image.Resampling.NEAREST)
  draw = ImageDraw.Draw(canvas)
  for obj in objects:
    pts = _outline(obj["shape"], *obj.pop("_cell"))
    fill = tuple(int(c) for c in obj.pop("_rgb"))
    big = [(px * _SS, py * _SS) for px, py in pts]
    paint = {"circle": draw.ellipse, "square": draw.rectangle}.get(obj["shape"], draw.polygon)
    paint(big, fill=fill)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    # floor(max) + 1: PIL fills the end pixel too, so the box covers every touched pixel.
    x0, y0 = math.floor(min(xs)), math.floor(min(ys))
    x1, y1 = min(size, math.floor(max(xs)) + 1), min(size, math.floor(max(ys)) + 1)
    obj["bbox"] = [x0, y0, x1 - x0, y1 - y0]
    obj["center"] = [(x0 + x1) / 2, (y0 + y1) / 2]
  image = canvas.resize((size, size), Image.Resampling.BOX)
  ann = {"id": f"{image_seed:010d}", "seed": int(image_seed), "width": size, "height": size,
         "background": kind, "caption": caption(objects, kind, rng), "objects": objects}
  return image, ann


def caption(objects: list[dict], background: str, rng) -> str:
  """A brief COCO-style caption naming every object (size, color, shape)."""
  ordered = rng.random() < 0.5
  objs = sorted(objects, key=lambda o: o["center"][0]) if ordered else objects
  items = join_words([f"a {o['size']} {o['color']} {o['shape']}" for o in objs])
  if ordered and len(objs) > 1:
    items += ", from left to right"
  n = len(objects)
  templates = [f"{items} on {BACKGROUNDS[background]}.",
               f"An image of {items}.",
               f"{NUMBER_WORDS[n].capitalize()} object{'s' if n > 1 else ''}: {items}.",
               f"A picture showing {items} on {BACKGROUNDS[background]}."]
  text = templates[rng.integers(len(templates))]
  return text[0].upper() + text[1:]


def _write_json_atomic(obj, path: Path) -> None:
  """Write JSON next to `path`, then rename: a crash never leaves a half-written file."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps(obj))  # json.dump streams through the pure-Python encoder: 4x slower
  os.replace(tmp, path)


def write_world(folder, split: str, n: int, seed: int = 0, size: int = 64, object_counts=None) -> list[dict]:
  """Write `n` images of `split` to FOLDER/images/SPLIT/ID.png and their annotations to
  FOLDER/SPLIT.json (image paths relative to FOLDER). Returns the annotations.
  `object_counts`: probabilities of 1-4 objects per image (default: uniform)."""
  folder = Path(folder)
  (folder / "images" / split).mkdir(parents=True, exist_ok=True)
  annotations = []
  for image_seed in image_seeds(split, n, seed):
    image, ann = render(image_seed, size, object_counts)
    ann = {"image": f"images/{split}/{ann['id']}.png", "split": split, **ann}
    image.save(folder / ann["image"], compress_level=1)  # fast; these images are tiny anyway
    annotations.append(ann)
  _write_json_atomic(annotations, folder / f"{split}.json")
  return annotations


def load_annotations(path) -> list[dict]:
  """Annotations written by `write_world`."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise LlavaJaxError(f"shapes: cannot read annotations {path}: {e}") from None
