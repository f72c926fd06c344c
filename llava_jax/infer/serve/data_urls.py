"""The bytes of a `data:` URL (image_url and video_url parts), their size checked before they are decoded."""

from __future__ import annotations

import base64
import binascii

from llava_jax.infer.serve.errors import ApiError


def data_url_bytes(url: str, kind: str, max_bytes: int) -> bytes:
  """A `data:<kind>/<type>;base64,<data>` URL -> its bytes; `kind` is "image" or "video". Never fetches anything."""
  param = f"{kind}_url"
  if not url.startswith("data:"):
    scheme = url.split(":", 1)[0] if ":" in url else "relative"
    raise ApiError(400, f"{param}: only data: URLs are accepted (got a {scheme[:20]!r} URL); "
                   "this server fetches nothing", f"unsupported_{param}", param=param)
  header, comma, payload = url[len("data:"):].partition(",")
  media_type = header.split(";")[0]
  if not comma or not header.endswith(";base64") or (media_type and not media_type.startswith(f"{kind}/")):
    raise ApiError(400, f"{param}: expected data:{kind}/<type>;base64,<data>", f"invalid_{param}", param=param)
  if len(payload) // 4 * 3 > max_bytes + 3:  # refuse before allocating the bytes
    raise too_large(kind, f"about {len(payload) // 4 * 3} bytes", f"{max_bytes} bytes")
  try:
    data = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise ApiError(400, f"{param}: the data is not valid base64", f"invalid_{kind}", param=param) from None
  if len(data) > max_bytes:
    raise too_large(kind, f"{len(data)} bytes", f"{max_bytes} bytes")
  return data


def too_large(kind: str, got: str, limit: str) -> ApiError:
  return ApiError(400, f"{kind}_url: {kind} is {got}, over the limit of {limit}", f"{kind}_too_large",
                  param=f"{kind}_url")
