"""The demo's data phase: ShapesWorld images, the instruction engine's LLaVA JSON, and the
texts stage 0 learns from (CLIP captions with hard negatives, the language-model corpus)."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from llava_jax.data import shapes, templates

COLORS, SHAPES = tuple(shapes.COLORS), shapes.SHAPES


def region(obj: dict, ann: dict) -> str:
  """Coarse position words of an object's center ("top left", "middle center", ...)."""
  row, col = divmod(patch_of(obj, ann, 3), 3)
  return f"{('top', 'middle', 'bottom')[row]} {('left', 'center', 'right')[col]}"


def _describe(objects: Sequence[dict], ann: dict) -> str:
  return " , ".join(f"{o['size']} {o['color']} {o['shape']} {region(o, ann)}" for o in objects)


def clip_caption(ann: dict) -> str:
  """Every object's size, color, shape and place, left to right: a caption that binds them."""
  return _describe(sorted(ann["objects"], key=lambda o: o["center"]), ann)


def hard_negative(ann: dict, rng: np.random.Generator) -> str:
  """The caption with one object's color or shape changed (or two objects' colors swapped)."""
  objects = [dict(o) for o in sorted(ann["objects"], key=lambda o: o["center"])]
  i = rng.integers(len(objects))
  colors = {o["color"] for o in objects}
  if len(colors) > 1 and rng.random() < 0.3:  # same words, different binding
    j = next(k for k in rng.permutation(len(objects)) if objects[k]["color"] != objects[i]["color"])
    objects[i]["color"], objects[j]["color"] = objects[j]["color"], objects[i]["color"]
  elif rng.random() < 0.5:
    objects[i]["color"] = str(rng.choice([c for c in COLORS if c != objects[i]["color"]]))
  else:
    objects[i]["shape"] = str(rng.choice([s for s in SHAPES if s != objects[i]["shape"]]))
  return _describe(objects, ann)


PHRASES = tuple(f"{size} {c} {s}" for size in shapes.SIZES for c in COLORS for s in SHAPES)


def patch_of(obj: dict, ann: dict, grid: int) -> int:
  """Row-major index of the patch (of a grid x grid tiling) that holds the object's center."""
  col = min(grid - 1, int(grid * obj["center"][0] / ann["width"]))
  row = min(grid - 1, int(grid * obj["center"][1] / ann["height"]))
  return row * grid + col


def region_targets(annotations: Sequence[dict], grid: int, slots: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Per image and object slot: the patch holding the object (-1: no object) and its index in
  `PHRASES` (CLIP's dense targets)."""
  patch = np.full((len(annotations), slots), -1, np.int32)
  phrase = np.zeros((len(annotations), slots), np.int32)
  for i, ann in enumerate(annotations):
    for j, o in enumerate(ann["objects"][:slots]):
      patch[i, j] = patch_of(o, ann, grid)
      phrase[i, j] = PHRASES.index(f"{o['size']} {o['color']} {o['shape']}")
  return patch, phrase


def rendered_texts(samples: Sequence[dict], template: str) -> list[str]:
  """The training text of LLaVA samples (image tags kept), as the trainer renders it."""
  return [templates.render(template, [(t["from"], t["value"]) for t in s["conversations"]], "", "</s>").text
          for s in samples]


def load_json(path: str):
  with open(path) as f:
    return json.load(f)


def image_path(folder: str, ann: dict) -> str:
  return os.path.join(folder, ann["image"])
