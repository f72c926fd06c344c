"""Images from `data:` URLs, checked against the limits before their pixels are decoded."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from llava_jax.data import images as images_lib
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.limits import Limits


def decode_image_url(url: str, limits: Limits) -> Image.Image:
  """A `data:image/...;base64,` URL -> RGB image. Never fetches anything."""
  if not url.startswith("data:"):
    scheme = url.split(":", 1)[0] if ":" in url else "relative"
    raise ApiError(400, f"image_url: only data: URLs are accepted (got a {scheme[:20]!r} URL); "
                   "this server fetches nothing", "unsupported_image_url", param="image_url")
  header, comma, payload = url[len("data:"):].partition(",")
  media_type = header.split(";")[0]
  if not comma or not header.endswith(";base64") or (media_type and not media_type.startswith("image/")):
    raise ApiError(400, "image_url: expected data:image/<type>;base64,<data>", "invalid_image_url",
                   param="image_url")
  if len(payload) // 4 * 3 > limits.max_image_bytes + 3:  # refuse before allocating the bytes
    raise _too_large(f"about {len(payload) // 4 * 3} bytes", f"{limits.max_image_bytes} bytes")
  try:
    data = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise ApiError(400, "image_url: the data is not valid base64", "invalid_image", param="image_url") from None
  if len(data) > limits.max_image_bytes:
    raise _too_large(f"{len(data)} bytes", f"{limits.max_image_bytes} bytes")
  try:
    with Image.open(io.BytesIO(data)) as header_only:  # reads the header, not the pixels
      width, height = header_only.size
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
    raise ApiError(400, "image_url: the data is not an image this server can decode", "invalid_image",
                   param="image_url") from None
  if width * height > limits.max_image_pixels:
    raise _too_large(f"{width}x{height} pixels", f"{limits.max_image_pixels} pixels")
  try:
    return images_lib.load_image(data, max_pixels=limits.max_image_pixels)
  except LlavaJaxError as e:
    raise ApiError(400, f"image_url: {e}", "invalid_image", param="image_url") from None


def _too_large(got: str, limit: str) -> ApiError:
  return ApiError(400, f"image_url: image is {got}, over the limit of {limit}", "image_too_large",
                  param="image_url")
