"""LLaVA-NeXT's AnyRes image geometry and pixels, with the rules of transformers' LlavaNext classes.

An image is resized, aspect preserved, into the best of the model's `image_grid_pinpoints` (see
`select_best_resolution`), centered on a black canvas of that resolution and cut into square tiles of
the vision tower's image size; the whole image squashed to the tower's size comes first. The model
turns the tiles' features into one (rows, cols) grid, crops it back to the image's aspect ratio
(`unpad_slices`) and ends every grid row with a newline embedding: `AnyResLayout.num_image_tokens`
counts the result, as `LlavaNextProcessor` does for its `<image>` expansion.

Sizes are (height, width) throughout, as transformers' `image_sizes`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

from llava_jax.data.images import PROCESSOR_CONFIG, ImageProcessor, read_image_processor_config
from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json

HW = Tuple[int, int]

FEATURE_STRATEGIES = ("default", "full")

# transformers pads the resized image with zeros before tiling (black, not the mean color).
TILE_PAD_RGB = (0, 0, 0)

# A feature index meaning the model's `image_newline` embedding instead of a tile feature (see feature_index).
NEWLINE = -1


def _image_hw(image_hw: Sequence[int], name: str) -> HW:
  height, width = (int(v) for v in image_hw)
  if height <= 0 or width <= 0:
    raise LlavaJaxError(f"{name}: image is {height}x{width} (height x width) pixels, zero-sized")
  return height, width


def select_best_resolution(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]],
                           name: str = "image") -> HW:
  """The (height, width) pinpoint that shows most of the image's pixels, then wastes the least area.

  The image is scaled (up or down) to fit each pinpoint; its pixels shown are those of the scaled
  size (truncated to ints, so zero for a side scaled below one pixel), at most the original count.
  Among equals the first pinpoint wins.
  """
  height, width = _image_hw(image_hw, name)
  if not pinpoints:
    raise LlavaJaxError(f"{name}: image_grid_pinpoints is empty, no resolution to choose from")

  def shown_then_unwasted(pinpoint: Sequence[int]) -> Tuple[int, int]:
    pin_h, pin_w = pinpoint
    scale = min(pin_w / width, pin_h / height)
    shown = min(int(width * scale) * int(height * scale), width * height)
    return shown, shown - pin_h * pin_w

  # max() returns the first of equal keys, which is transformers' strict-improvement loop.
  best = max(pinpoints, key=shown_then_unwasted)
  return int(best[0]), int(best[1])


def fit_within(image_hw: HW, target_hw: HW) -> HW:
  """Aspect-preserving size of `image_hw` scaled into `target_hw`: one side fills its target, the
  other rounds up (capped at its target)."""
  height, width = image_hw
  target_h, target_w = target_hw
  scale_w, scale_h = target_w / width, target_h / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), target_h), target_w
  return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_grid_shape(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int,
                      name: str = "image") -> HW:
  """(rows, cols) of tiles the image is cut into: its best resolution in tiles of `tile_size`."""
  best_h, best_w = select_best_resolution(image_hw, pinpoints, name)
  return best_h // tile_size, best_w // tile_size


def unpad_slices(image_hw: Sequence[int], grid_hw: HW) -> Tuple[slice, slice]:
  """(row slice, column slice) of a (rows, cols) feature grid that hold the image, not its padding.

  The grid covers the padded best resolution; the side the image did not fill loses the same
  number of rows (or columns) at both ends, so what stays has the image's aspect ratio.
  """
  height, width = image_hw
  rows, cols = grid_hw
  if width / height > cols / rows:
    # Rounded to 7 digits before truncating, so 0.9999999... rows count as one.
    pad = (rows - int(round(height * (cols / width), 7))) // 2
    return slice(pad, rows - pad), slice(0, cols)
  pad = (cols - int(round(width * (rows / height), 7))) // 2
  return slice(0, rows), slice(pad, cols - pad)


def _checked_pinpoints(pinpoints: Sequence[Sequence[int]], image_size: int) -> Tuple[HW, ...]:
  if not pinpoints:
    raise LlavaJaxError("image_grid_pinpoints is empty: AnyRes needs at least one [height, width]")
  checked = []
  for pinpoint in pinpoints:
    values = list(pinpoint) if isinstance(pinpoint, (list, tuple)) else [pinpoint]
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
      raise LlavaJaxError(f"image_grid_pinpoints: {pinpoint!r} is not a [height, width] pair of positive ints")
    if values[0] % image_size or values[1] % image_size:
      raise LlavaJaxError(f"image_grid_pinpoints: {values} is not a multiple of the vision tower's image "
                          f"size {image_size}")
    checked.append((int(values[0]), int(values[1])))
  return tuple(checked)


@dataclasses.dataclass(frozen=True)
class AnyResLayout:
  """One model's AnyRes geometry: the tower's square input (`image_size`) and patch, the pinpoints,
  and which tower outputs become image features.

  `num_additional_image_tokens`: tokens the tower outputs besides its patches (CLIP's CLS: 1), as in
  LlavaNextProcessor's config; the "default" strategy drops one of them, "full" keeps them.
  """
  image_size: int
  patch_size: int
  grid_pinpoints: Tuple[HW, ...]
  vision_feature_select_strategy: str = "default"
  num_additional_image_tokens: int = 1

  def __post_init__(self):
    object.__setattr__(self, "grid_pinpoints", _checked_pinpoints(self.grid_pinpoints, self.image_size))
    if self.vision_feature_select_strategy not in FEATURE_STRATEGIES:
      raise LlavaJaxError(f"vision_feature_select_strategy: {self.vision_feature_select_strategy!r} is not one "
                          f"of {', '.join(FEATURE_STRATEGIES)}")

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def tokens_per_tile(self) -> int:
    """Features the tower gives one tile after the select strategy (the whole-image tile's count)."""
    dropped = 1 if self.vision_feature_select_strategy == "default" else 0
    return self.patches_per_side ** 2 + self.num_additional_image_tokens - dropped

  def check_image(self, image_hw: Sequence[int], name: str = "image") -> HW:
    """(height, width) of an image the tower can see: not zero-sized, at least one patch each way."""
    height, width = _image_hw(image_hw, name)
    if height < self.patch_size or width < self.patch_size:
      raise LlavaJaxError(f"{name}: image is {height}x{width} (height x width) pixels, smaller than one "
                          f"{self.patch_size}x{self.patch_size} patch of the vision tower")
    return height, width

  def best_resolution(self, image_hw: Sequence[int], name: str = "image") -> HW:
    return select_best_resolution(self.check_image(image_hw, name), self.grid_pinpoints, name)

  def grid_shape(self, image_hw: Sequence[int], name: str = "image") -> HW:
    """(rows, cols) of tiles; the pixels hold rows * cols + 1 images (the whole one first)."""
    return anyres_grid_shape(self.check_image(image_hw, name), self.grid_pinpoints, self.image_size, name)

  def num_image_tokens(self, image_hw: Sequence[int], name: str = "image") -> int:
    """Tokens one `<image>` expands to: the whole image's features, then the unpadded tile-feature
    grid with a newline closing each of its rows."""
    rows, cols = self.grid_shape(image_hw, name)
    row_slice, col_slice = unpad_slices(image_hw, (rows * self.patches_per_side, cols * self.patches_per_side))
    kept_rows = row_slice.stop - row_slice.start
    kept_cols = col_slice.stop - col_slice.start
    return self.tokens_per_tile + kept_rows * (kept_cols + 1)

  def tiles(self, image_hw: Sequence[int], name: str = "image") -> int:
    """Tower inputs of one image: the whole image and its rows * cols tiles."""
    rows, cols = self.grid_shape(image_hw, name)
    return rows * cols + 1

  def feature_grid(self, image_hw: Sequence[int], name: str = "image") -> np.ndarray:
    """int32 (rows, cols): the image's unpadded tile-feature grid, each entry an index into its tiles' features
    flattened (tile-major, `tokens_per_tile` each; tile 0 is the whole image): the tiles' patch grids joined into
    one (rows * p, cols * p) grid, cropped by `unpad_slices` (transformers' `pack_image_features`)."""
    rows, cols = self.grid_shape(image_hw, name)
    side, per_tile = self.patches_per_side, self.tokens_per_tile
    if per_tile != side * side:
      raise LlavaJaxError(f"AnyRes: a tile gives {per_tile} features, not the {side}x{side} patch grid the layout "
                          f"needs (vision_feature_select_strategy {self.vision_feature_select_strategy!r} with "
                          f"{self.num_additional_image_tokens} additional token(s))")
    row_slice, col_slice = unpad_slices(image_hw, (rows * side, cols * side))
    r = np.arange(row_slice.start, row_slice.stop)[:, None]
    c = np.arange(col_slice.start, col_slice.stop)[None, :]
    tile = 1 + (r // side) * cols + c // side
    return (tile * per_tile + (r % side) * side + c % side).astype(np.int32)

  def feature_index(self, image_hw: Sequence[int], name: str = "image") -> np.ndarray:
    """int32 (num_image_tokens,): the feature each of the image's tokens takes, as an index into its tiles' features
    flattened, NEWLINE for the newline embedding: the whole image's features, then `feature_grid` read row by row
    with a newline after each row."""
    return with_row_newlines(np.arange(self.tokens_per_tile), self.feature_grid(image_hw, name))

  def pixels(self, img: Image.Image, processor: ImageProcessor, name: str = "image") -> np.ndarray:
    return anyres_pixels(img, processor, self, name)

  def check_processor_files(self, folder: str) -> None:
    """A model folder's LlavaNextProcessor settings (processor_config.json) and image processor pinpoints
    must be this layout's (the model's config.json), or the token counts would not match the features."""
    path = os.path.join(folder, PROCESSOR_CONFIG)
    found = read_json(path) if os.path.isfile(path) else {}
    ours = {"patch_size": self.patch_size, "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "num_additional_image_tokens": self.num_additional_image_tokens}
    for key, value in ours.items():
      if found.get(key, value) != value:
        raise LlavaJaxError(f"{path}: {key} is {found[key]!r} but the model's config.json gives {value!r}")
    image_config = read_image_processor_config(folder) or {}
    pinpoints = image_config.get("image_grid_pinpoints")
    if pinpoints is not None and [tuple(p) for p in pinpoints] != list(self.grid_pinpoints):
      raise LlavaJaxError(f"{folder}: the image processor's image_grid_pinpoints {pinpoints} differ from the model's "
                          f"{[list(p) for p in self.grid_pinpoints]}")


def with_row_newlines(base: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """`base` (n, ...) then `grid` (rows, cols, ...) read row by row, each row closed by a NEWLINE entry."""
  newline = np.full((len(grid), 1) + grid.shape[2:], NEWLINE, grid.dtype)
  rows = np.concatenate([grid, newline], axis=1)
  return np.concatenate([base, rows.reshape((-1,) + grid.shape[2:])]).astype(np.int32)


def _overview_hw(processor: ImageProcessor) -> HW:
  """Size the whole image is squashed to before the per-tile resize and crop (transformers' rule)."""
  size = processor.size
  if "height" in size:
    return size["height"], size["width"]
  return size["shortest_edge"], size["shortest_edge"]


def _tile_side(processor: ImageProcessor) -> int:
  """The tile side transformers cuts the canvas into: the crop height, else (OneVision: no crop) the resize height."""
  if processor.crop_size:
    return processor.crop_size["height"]
  return _overview_hw(processor)[0]


def anyres_pixels(img: Image.Image, processor: ImageProcessor, layout: AnyResLayout,
                  name: str = "image") -> np.ndarray:
  """One image -> float32 (rows * cols + 1, S, S, 3), S = layout.image_size: the whole image, then
  the tiles row by row, each resized, cropped, rescaled and normalized by `processor`."""
  tile = _tile_side(processor)
  if processor.pad_to_square or tile != layout.image_size or processor.output_size != (tile, tile):
    raise LlavaJaxError(
        f"image processor (crop_size {processor.crop_size}, pad_to_square {processor.pad_to_square}) does not "
        f"give the {layout.image_size}x{layout.image_size} unpadded tiles the vision tower takes")
  img = processor.as_rgb(img)
  best_h, best_w = layout.best_resolution((img.height, img.width), name)
  fit_h, fit_w = fit_within((img.height, img.width), (best_h, best_w))
  canvas = Image.new("RGB", (best_w, best_h), TILE_PAD_RGB)
  canvas.paste(img.resize((fit_w, fit_h), resample=processor.resample),
               ((best_w - fit_w) // 2, (best_h - fit_h) // 2))
  overview_h, overview_w = _overview_hw(processor)
  views = [img.resize((overview_w, overview_h), resample=processor.resample)]
  views += [canvas.crop((left, top, left + tile, top + tile))
            for top in range(0, best_h, tile) for left in range(0, best_w, tile)]
  return processor(views)
