"""Videos from `video_url` parts, decoded and sampled to the model's frame count (data/video_io.py): a
`data:video/...;base64,` URL, or, only on a server started with `--allow-local-media DIR`, a video file or frames
folder under DIR (a path, absolute or relative to DIR, or a file:// URL)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from llava_jax.data.video_io import read_video
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.serve.data_urls import data_url_bytes
from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.limits import Limits

PARAM = "video_url"


def decode_video_url(url: str, limits: Limits, num_frames: Optional[int], media_dir: Optional[str]) -> np.ndarray:
  """uint8 (num_frames, H, W, 3) frames; `num_frames` None: the model takes no videos."""
  if num_frames is None:
    raise ApiError(400, "video_url: this model takes no videos", "unsupported_video", param=PARAM)
  if media_dir is not None and not url.startswith("data:"):
    source = local_media_path(url, media_dir)
  else:
    source = data_url_bytes(url, "video", limits.max_video_bytes)
  try:
    return read_video(source, num_frames, limits.max_image_pixels, name="video")
  except LlavaJaxError as e:
    raise ApiError(400, f"{PARAM}: {e}", "invalid_video", param=PARAM) from None


def local_media_path(url: str, media_dir: str) -> str:
  """The file a local video_url names, refused unless it lies under `media_dir` (symbolic links resolved)."""
  path = url[len("file://"):] if url.startswith("file://") else url
  if "://" in path:
    raise ApiError(400, f"{PARAM}: only data: URLs and local paths are accepted; this server fetches nothing",
                   f"unsupported_{PARAM}", param=PARAM)
  root = os.path.realpath(media_dir)
  real = os.path.realpath(os.path.join(root, path))
  if os.path.commonpath([real, root]) != root:
    raise ApiError(403, f"{PARAM}: {path!r} is outside the folder this server may read media from",
                   "forbidden_path", param=PARAM)
  if not os.path.exists(real):
    raise ApiError(400, f"{PARAM}: {path!r}: no such file or folder", "invalid_video", param=PARAM)
  return real
