"""How a video's decoded frames become tower inputs and video tokens, per model type (data/layouts.py's images).

Each frame is one tower input, preprocessed alone by the image processor's plain resize (no AnyRes tiling, no
padding), as transformers' video processors do; in a prompt row its features follow those of the media before it,
as an image's tiles do. Which features a video's tokens take is its layout's feature index:
- OneVision (`BilinearPooledVideo`): each frame's feature grid resized to half its sides rounded up, bilinearly
  and after the projector (transformers' `apply_pooling`): the FeatureMix of its downscaled images; then one
  newline after the last frame.
- NeXT-Video (`TowerPooledVideo`): each frame's tower features pooled (average or max) before the projector,
  which the model does for every tower input (models/llava.Llava.encode_images); the index takes those
  (image_tokens.pooled_index). No newline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image

from llava_jax.config import LlavaConfig
from llava_jax.data.anyres import NEWLINE
from llava_jax.data.images import ImageProcessor
from llava_jax.data.onevision import downscale_mix
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import MIX_TAPS, FeatureMix, as_mix, pooled_index

Frames = Union[np.ndarray, Sequence[np.ndarray]]  # (F, H, W, 3) uint8, or F arrays (H, W, 3) uint8


@dataclasses.dataclass(frozen=True)
class _VideoLayout:
  """What the video layouts share: frames as tower inputs, and the checks of a video's frames."""
  patches_per_side: int
  max_tokens: int  # the text model's positions: a video of more tokens cannot be taken

  @property
  def tokens_per_tile(self) -> int:
    return self.patches_per_side ** 2

  def num_video_tokens(self, num_frames: int) -> int:
    raise NotImplementedError

  def tiles(self, num_frames: int) -> int:
    return num_frames

  def check_frames(self, num_frames: int, name: str = "video") -> None:
    if num_frames == 0:
      raise LlavaJaxError(f"{name}: no frames")
    tokens = self.num_video_tokens(num_frames)
    if tokens > self.max_tokens:
      raise LlavaJaxError(f"{name}: {num_frames} frames take {tokens} video tokens, more than the model's "
                          f"{self.max_tokens} positions (sample fewer frames)")

  def pixels(self, frames: Frames, processor: ImageProcessor, name: str = "video") -> np.ndarray:
    """float32 (F, S, S, 3): each frame preprocessed alone (the processor's resize, crop and normalization)."""
    frames = [np.asarray(frame) for frame in frames]
    self.check_frames(len(frames), name)
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1 or len(frames[0].shape) != 3 or frames[0].shape[-1] != 3 or frames[0].dtype != np.uint8:
      raise LlavaJaxError(f"{name}: frames must be uint8 arrays of one (height, width, 3) shape, got "
                          f"{sorted(map(str, shapes))[:2]} of {frames[0].dtype}")
    return dataclasses.replace(processor, pad_to_square=False)([Image.fromarray(frame) for frame in frames])


@dataclasses.dataclass(frozen=True)
class BilinearPooledVideo(_VideoLayout):
  """LLaVA-OneVision: frame features pooled 2x2 bilinearly after the projector, one newline per video."""

  @property
  def pooled_side(self) -> int:
    return math.ceil(self.patches_per_side / 2)

  def num_video_tokens(self, num_frames: int) -> int:
    return num_frames * self.pooled_side ** 2 + 1

  def feature_index(self, num_frames: int) -> FeatureMix:
    side, pooled = self.patches_per_side, (self.pooled_side,) * 2
    grids = np.arange(num_frames * self.tokens_per_tile, dtype=np.int32).reshape(num_frames, side, side)
    mixes = [downscale_mix(grid, pooled) for grid in grids] + [as_mix(np.array([NEWLINE]))]
    return FeatureMix(*(np.concatenate([part.reshape(-1, MIX_TAPS) for part in parts])
                        for parts in zip(*mixes)))


@dataclasses.dataclass(frozen=True)
class TowerPooledVideo(_VideoLayout):
  """LLaVA-NeXT-Video: each frame's tower features pooled by `stride` before the projector; no newline."""
  stride: int = 2

  @property
  def pooled_per_frame(self) -> int:
    return (self.patches_per_side // self.stride) ** 2

  def num_video_tokens(self, num_frames: int) -> int:
    return num_frames * self.pooled_per_frame

  def feature_index(self, num_frames: int) -> np.ndarray:
    starts = np.arange(num_frames)[:, None] * self.tokens_per_tile
    return pooled_index((starts + np.arange(self.pooled_per_frame)).ravel())


VideoLayout = Union[BilinearPooledVideo, TowerPooledVideo]


def _side(config: LlavaConfig) -> int:
  return config.vision.image_size // config.vision.patch_size


# LlavaConfig.model_type -> its video layout (the types that take videos).
VIDEO_LAYOUTS: dict[str, Callable[[LlavaConfig], VideoLayout]] = {
    "llava_onevision": lambda c: BilinearPooledVideo(_side(c), c.text.max_position_embeddings),
    "llava_next_video": lambda c: TowerPooledVideo(_side(c), c.text.max_position_embeddings, c.spatial_pool_stride),
}


def video_layout_for(config: LlavaConfig) -> VideoLayout:
  if config.model_type not in VIDEO_LAYOUTS:
    raise LlavaJaxError(f"a {config.model_type} model takes no videos (video models: {', '.join(VIDEO_LAYOUTS)})")
  return VIDEO_LAYOUTS[config.model_type](config)
