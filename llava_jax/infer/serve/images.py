"""Images from `data:` URLs, checked against the limits before their pixels are decoded."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from llava_jax.data import images as images_lib
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.serve.data_urls import data_url_bytes, too_large
from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.limits import Limits


def decode_image_url(url: str, limits: Limits) -> Image.Image:
  """A `data:image/...;base64,` URL -> RGB image. Never fetches anything."""
  data = data_url_bytes(url, "image", limits.max_image_bytes)
  try:
    with Image.open(io.BytesIO(data)) as header_only:  # reads the header, not the pixels
      width, height = header_only.size
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
    raise ApiError(400, "image_url: the data is not an image this server can decode", "invalid_image",
                   param="image_url") from None
  if width * height > limits.max_image_pixels:
    raise too_large("image", f"{width}x{height} pixels", f"{limits.max_image_pixels} pixels")
  try:
    return images_lib.load_image(data, max_pixels=limits.max_image_pixels)
  except LlavaJaxError as e:
    raise ApiError(400, f"image_url: {e}", "invalid_image", param="image_url") from None
