"""The demo's data phase: ShapesWorld images, the instruction engine's LLaVA JSON, and the
texts stage 0 learns from (CLIP captions with hard negatives, the language-model corpus)."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from llava_jax.data import instruct_engine, shapes, templates

COLORS, SHAPES = tuple(shapes.COLORS), shapes.SHAPES


def region(obj: dict, ann: dict) -> str:
  """Coarse position words of an object's center ("top left", "middle center", ...)."""
  col = ("left", "center", "right")[min(2, int(3 * obj["center"][0] / ann["width"]))]
  row = ("top", "middle", "bottom")[min(2, int(3 * obj["center"][1] / ann["height"]))]
  return f"{row} {col}"


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


def object_token(color: str, shape: str) -> str:
  return f"<{color}_{shape}>"


EMPTY_TOKEN = "<empty>"
GRID_TOKENS = (EMPTY_TOKEN,) + tuple(object_token(c, s) for c in COLORS for s in SHAPES)


def grid_scene(ann: dict, grid: int) -> str:
  """The scene as `grid` x `grid` cell words, row by row: the object centered in each cell, or
  `<empty>`. It has the vision tower's patch layout, so a language model that learned to read it
  reads projected patch features the same way once stage 1 has aligned them."""
  cells = [EMPTY_TOKEN] * (grid * grid)
  for o in sorted(ann["objects"], key=lambda o: -o["bbox"][2] * o["bbox"][3]):  # larger wins a shared cell
    col = min(grid - 1, int(grid * o["center"][0] / ann["width"]))
    row = min(grid - 1, int(grid * o["center"][1] / ann["height"]))
    if cells[row * grid + col] == EMPTY_TOKEN:
      cells[row * grid + col] = object_token(o["color"], o["shape"])
  return "".join(cells)


def rendered_texts(samples: Sequence[dict], template: str) -> list[str]:
  """The training text of LLaVA samples (image tags kept), as the trainer renders it."""
  return [templates.render(template, [(t["from"], t["value"]) for t in s["conversations"]], "", "</s>").text
          for s in samples]


def write(folder: str, n_train: int, n_test: int, size: int = 64, seed: int = 0) -> dict:
  """Writes images, annotations and LLaVA JSON under `folder`; returns the paths and annotations."""
  train = shapes.write_world(folder, "train", n_train, seed, size)
  test = shapes.write_world(folder, "test", n_test, seed, size)
  paths = instruct_engine.write_datasets(folder, "train", seed)
  return {"folder": folder, "train": train, "test": test,
          "caption_json": str(paths["caption"]), "instruct_json": str(paths["instruct"])}


def load_json(path: str):
  with open(path) as f:
    return json.load(f)


def image_path(folder: str, ann: dict) -> str:
  return os.path.join(folder, ann["image"])
