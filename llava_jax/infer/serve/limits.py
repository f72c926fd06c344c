"""What one request may ask for."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
  """Checked before any expensive work (images: before decoding)."""
  max_body_bytes: int = 64 * 2**20
  max_image_bytes: int = 20 * 2**20
  max_image_pixels: int = 4096 * 4096
  max_images: int = 8
  max_video_bytes: int = 48 * 2**20  # a data URL's decoded bytes (the body limit bounds it too)
  max_videos: int = 2  # each is decoded twice and sampled to the model's frame count
  default_max_tokens: int = 512  # when the request gives none (and the context has room)
