"""LLaVA-OneVision's image layout, with the rules of transformers' LlavaOnevision classes.

A prompt with one image tiles it as LLaVA-NeXT does (data/anyres.py) and keeps its unpadded tile-feature grid,
unless the grid holds more than `max_tiles` (the N of vision_aspect_ratio "anyres_max_N") tiles' worth of
features by a factor over 1.1 in area: then the grid is downscaled by that factor with torch's bilinear
interpolation (`nn.functional.interpolate(mode="bilinear")`: align_corners False, no antialiasing) before each
row gets its newline. A downscaled token blends up to four features, so this layout's feature index is a
`FeatureMix` (image_tokens.py) that the host computes and the model applies as a weighted gather.

A prompt with several images does not tile them: each is padded to a square of the mean color, resized to the
tower's input and takes its features plus one newline (`MultiImageLayout`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

from llava_jax.data.anyres import NEWLINE, AnyResLayout, with_row_newlines
from llava_jax.data.images import PROCESSOR_CONFIG, ImageProcessor
from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json
from llava_jax.image_tokens import MIX_TAPS, FeatureMix, as_mix

# Above this ratio of a grid's side to the side of `max_tiles` tiles' worth, transformers downscales it.
DOWNSCALE_RATIO = 1.1


def downscaled_hw(grid_hw: Tuple[int, int], max_tiles: int, patches_per_side: int) -> Tuple[int, int]:
  """(rows, cols) of the unpadded feature grid after anyres_max downscaling (unchanged when small enough)."""
  rows, cols = grid_hw
  ratio = math.sqrt(rows * cols / (max_tiles * patches_per_side ** 2))
  if ratio <= DOWNSCALE_RATIO:
    return rows, cols
  return int(rows // ratio), int(cols // ratio)


def bilinear_taps(size_in: int, size_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """torch's 1-D bilinear sampling (align_corners=False, no antialias) from `size_in` to `size_out` points:
  for each output point its two input neighbours (low, high) and their weights, as upsample_bilinear2d computes
  them in float32 (source clamped at 0, high neighbour clamped at the last input)."""
  scale = np.float32(size_in / size_out)
  source = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
  low = np.floor(source).astype(np.int64)
  high = np.minimum(low + 1, size_in - 1)
  weight_high = np.clip(source - low, 0, 1).astype(np.float32)
  return low, high, np.float32(1) - weight_high, weight_high


def downscale_mix(grid: np.ndarray, out_hw: Tuple[int, int]) -> FeatureMix:
  """The (out_rows, out_cols, MIX_TAPS) mix that bilinearly resizes a (rows, cols) grid of feature indices (the
  grid itself, weight 1, where the size stays: also a grid unpadding left empty)."""
  if tuple(out_hw) == grid.shape:
    return as_mix(grid)
  row_low, row_high, row_wlow, row_whigh = bilinear_taps(grid.shape[0], out_hw[0])
  col_low, col_high, col_wlow, col_whigh = bilinear_taps(grid.shape[1], out_hw[1])
  index = np.stack([grid[np.ix_(r, c)] for r in (row_low, row_high) for c in (col_low, col_high)], axis=-1)
  weights = np.stack([np.outer(wr, wc) for wr in (row_wlow, row_whigh) for wc in (col_wlow, col_whigh)], axis=-1)
  return FeatureMix(index.astype(np.int32), weights.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class OneVisionLayout:
  """A prompt's lone image: AnyRes tiles, the unpadded grid downscaled past `max_tiles` tiles' worth."""
  anyres: AnyResLayout
  max_tiles: int

  @property
  def tokens_per_tile(self) -> int:
    return self.anyres.tokens_per_tile

  def for_prompt(self, num_images: int):
    """The layout of a prompt's images: this one for a lone image, no tiling for several."""
    return self if num_images == 1 else MultiImageLayout(self.tokens_per_tile)

  def tiles(self, image_hw: Sequence[int], name: str = "image") -> int:
    return self.anyres.tiles(image_hw, name)

  def _grid(self, image_hw: Sequence[int], name: str) -> Tuple[np.ndarray, Tuple[int, int]]:
    grid = self.anyres.feature_grid(image_hw, name)
    return grid, downscaled_hw(grid.shape, self.max_tiles, self.anyres.patches_per_side)

  def num_image_tokens(self, image_hw: Sequence[int], name: str = "image") -> int:
    """The whole image's features, then the (downscaled) grid with a newline closing each row."""
    rows, cols = self._grid(image_hw, name)[1]
    return self.tokens_per_tile + rows * (cols + 1)

  def feature_index(self, image_hw: Sequence[int], name: str = "image") -> FeatureMix:
    grid, out_hw = self._grid(image_hw, name)
    mix = downscale_mix(grid, out_hw)
    base = as_mix(np.arange(self.tokens_per_tile))
    newline_weights = as_mix(np.full((len(mix.weights), 1), NEWLINE)).weights
    weights = np.concatenate([mix.weights, newline_weights], axis=1).reshape(-1, MIX_TAPS)
    return FeatureMix(with_row_newlines(base.index, mix.index), np.concatenate([base.weights, weights]))

  def pixels(self, img: Image.Image, processor: ImageProcessor, name: str = "image") -> np.ndarray:
    return self.anyres.pixels(img, processor, name)

  def check_processor_files(self, folder: str) -> None:
    """LlavaOnevisionProcessor's counting settings (processor_config.json) must be the model's config.json's."""
    self.anyres.check_processor_files(folder)
    path = os.path.join(folder, PROCESSOR_CONFIG)
    found = read_json(path) if os.path.isfile(path) else {}
    ours = {"vision_aspect_ratio": f"anyres_max_{self.max_tiles}", "num_image_tokens": self.tokens_per_tile}
    for key, value in ours.items():
      if found.get(key, value) != value:
        raise LlavaJaxError(f"{path}: {key} is {found[key]!r} but the model's config.json gives {value!r}")


@dataclasses.dataclass(frozen=True)
class MultiImageLayout:
  """One of several images in a prompt: padded to a square, one tower input, its features then one newline."""
  tokens_per_tile: int

  def tiles(self, image_hw: Sequence[int], name: str = "image") -> int:
    return 1

  def num_image_tokens(self, image_hw: Sequence[int], name: str = "image") -> int:
    return self.tokens_per_tile + 1

  def feature_index(self, image_hw: Sequence[int], name: str = "image") -> np.ndarray:
    return np.append(np.arange(self.tokens_per_tile), NEWLINE).astype(np.int32)

  def pixels(self, img: Image.Image, processor: ImageProcessor, name: str = "image") -> np.ndarray:
    return dataclasses.replace(processor, pad_to_square=True)([img])

  def check_processor_files(self, folder: str) -> None:
    """Checked by the OneVisionLayout it comes from."""
