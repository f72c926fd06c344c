"""How an image becomes tower inputs and image tokens, per model type (one table, as towers and decoders).

A layout answers, for one image of a given (height, width): its tower inputs (`pixels`, (tiles, S, S, 3)),
how many `<image>` tokens it expands to (`num_image_tokens`), and which feature each of those tokens takes
(`feature_index`: an index into the image's tiles' features flattened, `tokens_per_tile` per tile, or
anyres.NEWLINE for the model's newline embedding; OneVision's blends of features are a FeatureMix of such
indexes and their weights). The model gathers by that index, so the data-dependent part of a layout (AnyRes
unpadding, OneVision's downscaling) stays on the host and the compiled shapes stay static. Where a layout
depends on how many images a prompt has (OneVision tiles a lone image only), `prompt_layout` picks it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Protocol, Sequence, Union

import numpy as np
from PIL import Image

from llava_jax.config import LlavaConfig
from llava_jax.data.anyres import NEWLINE, AnyResLayout
from llava_jax.data.images import ImageProcessor
from llava_jax.data.onevision import OneVisionLayout
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import FeatureMix, as_mix

FEATURE_INDEX = "image_feature_index"  # a model key of batches whose layout orders features by image size
FEATURE_WEIGHTS = "image_feature_weights"  # with FEATURE_INDEX, of batches whose layout blends features (OneVision)


class ImageLayout(Protocol):
  tokens_per_tile: int

  def tiles(self, image_hw: Sequence[int], name: str = "image") -> int: ...

  def num_image_tokens(self, image_hw: Sequence[int], name: str = "image") -> int: ...

  def feature_index(self, image_hw: Sequence[int], name: str = "image") -> np.ndarray | FeatureMix: ...

  def pixels(self, img: Image.Image, processor: ImageProcessor, name: str = "image") -> np.ndarray: ...

  def check_processor_files(self, folder: str) -> None:
    """Raises when the folder's processor files count image tokens otherwise than the model."""


@dataclasses.dataclass(frozen=True)
class FixedLayout:
  """LLaVA-1.0/1.5: the image preprocessed to one tower input whose features are its tokens, in order."""
  tokens_per_tile: int

  def tiles(self, image_hw: Sequence[int], name: str = "image") -> int:
    return 1

  def num_image_tokens(self, image_hw: Sequence[int], name: str = "image") -> int:
    return self.tokens_per_tile

  def feature_index(self, image_hw: Sequence[int], name: str = "image") -> np.ndarray:
    return np.arange(self.tokens_per_tile, dtype=np.int32)

  def pixels(self, img: Image.Image, processor: ImageProcessor, name: str = "image") -> np.ndarray:
    return processor([img])

  def check_processor_files(self, folder: str) -> None:
    """Nothing to check: the count is config.json's image_seq_length, which the config already checks."""


def _anyres(config: LlavaConfig) -> AnyResLayout:
  return AnyResLayout(config.vision.image_size, config.vision.patch_size, config.image_grid_pinpoints,
                      config.vision_feature_select_strategy, config.vision.class_tokens)


# LlavaConfig.model_type -> its image layout.
IMAGE_LAYOUTS: dict[str, Callable[[LlavaConfig], Union[FixedLayout, AnyResLayout, OneVisionLayout]]] = {
    "llava": lambda config: FixedLayout(config.tokens_per_tile),
    "llava_next": _anyres,
    "llava_next_video": _anyres,  # its images are LLaVA-NeXT's
    "llava_onevision": lambda config: OneVisionLayout(_anyres(config), config.anyres_max_tiles),
}


def layout_for(config: LlavaConfig) -> ImageLayout:
  return IMAGE_LAYOUTS[config.model_type](config)


def prompt_layout(layout: ImageLayout, num_images: int) -> ImageLayout:
  """The layout of the images of a prompt (or training sample) with `num_images` images."""
  return layout.for_prompt(num_images) if isinstance(layout, OneVisionLayout) else layout


def image_labels(images: Sequence) -> list[str]:
  """How errors name a prompt's or sample's images: each one's file, else its place among them."""
  return [os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {i + 1}"
          for i, image in enumerate(images)]


def images_feature_index(layout: ImageLayout, sizes: Sequence[Sequence[int]],
                         names: Sequence[str] | None = None) -> np.ndarray | FeatureMix:
  """int32 (image tokens of all images,): each image's `feature_index`, shifted past the tiles of the images
  before it, so that it indexes the features of all the images' tiles in order (what a prompt row feeds the
  model with its image tokens: the row's k-th image token takes feature index[k]); a FeatureMix where an
  image's index is one. `layout` is the prompt's (see prompt_layout)."""
  names = names or image_labels([None] * len(sizes))
  return join_feature_indexes([layout.feature_index(size, name) for size, name in zip(sizes, names)],
                              [layout.tiles(size, name) for size, name in zip(sizes, names)], layout.tokens_per_tile)


def join_feature_indexes(indexes: Sequence[np.ndarray | FeatureMix], tiles: Sequence[int],
                         tokens_per_tile: int) -> np.ndarray | FeatureMix:
  """The feature indexes of a row's images and videos (in prompt order, the i-th taking tiles[i] tower inputs)
  as one index into all their tower inputs' features; a FeatureMix where any of them is one."""
  parts, before = [np.zeros(0, np.int32)], 0
  for index, count in zip(indexes, tiles):
    parts.append(shift_feature_index(index, before, tokens_per_tile))
    before += count
  if any(isinstance(part, FeatureMix) for part in parts):
    mixes = [as_mix(part) for part in parts]
    return FeatureMix(np.concatenate([m.index for m in mixes]), np.concatenate([m.weights for m in mixes]))
  return np.concatenate(parts)


def shift_feature_index(index: np.ndarray | FeatureMix, tiles_before: int,
                        tokens_per_tile: int) -> np.ndarray | FeatureMix:
  """int32 `index` into the features of some tiles, made an index into the features of `tiles_before` other tiles
  followed by those (NEWLINE entries stay; pooled ones, image_tokens.POOLED_BASE, shift the other way)."""
  if isinstance(index, FeatureMix):
    return index._replace(index=shift_feature_index(index.index, tiles_before, tokens_per_tile))
  shift = tiles_before * tokens_per_tile
  return np.where(index >= 0, index + shift, np.where(index == NEWLINE, NEWLINE, index - shift)).astype(np.int32)


def images_pixels(layout: ImageLayout, images: Sequence[Image.Image], processor: ImageProcessor,
                  names: Sequence[str]) -> np.ndarray:
  """float32 (tiles of all images, S, S, 3): each image's tower inputs, in order."""
  tiles = [layout.pixels(img, processor, name) for img, name in zip(images, names)]
  return np.concatenate(tiles) if tiles else processor([])


def orders_features_by_size(layout: ImageLayout) -> bool:
  """Whether an image's tiles, token count and feature order depend on its size (AnyRes), so that a batch
  carries each row's feature index; the fixed layout's k-th image token takes feature k, no index needed."""
  return not isinstance(layout, FixedLayout)


def mixes_features(layout: ImageLayout) -> bool:
  """Whether an image token of the layout can blend features (a FeatureMix index: OneVision's downscaling)."""
  return isinstance(layout, OneVisionLayout)


def max_tiles_per_image(layout: ImageLayout) -> int:
  """The most tower inputs one image can take: 1, or AnyRes's largest pinpoint in tiles plus the whole image."""
  if not orders_features_by_size(layout):
    return 1
  anyres = layout.anyres if isinstance(layout, OneVisionLayout) else layout
  return 1 + max(h * w for h, w in anyres.grid_pinpoints) // anyres.image_size ** 2


def expand_image_tags(text: str, tag: str, image_token: str, counts: Sequence[int]) -> str:
  """`text` with its i-th `tag` replaced by counts[i] image tokens (the i-th image's, in order)."""
  pieces = text.split(tag)
  if len(pieces) - 1 != len(counts):
    raise LlavaJaxError(f"text has {len(pieces) - 1} {tag} tag(s) but {len(counts)} image(s); they must match")
  return pieces[0] + "".join(image_token * n + piece for n, piece in zip(counts, pieces[1:]))
