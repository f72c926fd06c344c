"""Reading a video for a model: a video file (mp4, webm, mkv, ... through PyAV) or a folder of frames (image
files, in name order), sampled uniformly to the model's frame count.

Sampling is transformers' and lmms-eval's: frame indices `np.linspace(0, total - 1, num_frames).astype(int)`
(a video shorter than `num_frames` repeats frames). The frame count is the model folder's (`num_frames_for`):
`num_frames` of its video_preprocessor_config.json or processor_config.json, `video_num_frames` /
`frames_upbound` of its config.json (original LLaVA-NeXT releases), else DEFAULT_NUM_FRAMES of its model type.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Union

import numpy as np

from llava_jax.data import images as images_lib
from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json

VideoSource = Union[str, os.PathLike, bytes, bytearray]
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
# lmms-eval's frame counts of the released models: OneVision 32 (max_frames_num), LLaVA-NeXT-Video 8 (its
# 7B model's 4096 positions hold 8 frames of 144 tokens; transformers' examples use 8 too).
DEFAULT_NUM_FRAMES = {"llava_onevision": 32, "llava_next_video": 8}


def sample_indices(total: int, num_frames: int) -> np.ndarray:
  return np.linspace(0, total - 1, num_frames).astype(int)


def num_frames_for(folder: str, model_type: str, override: Optional[int] = None) -> int:
  """How many frames a video of this model folder is sampled to: `override` (--num-frames), the folder's, else
  the model type's default."""
  if override is None:
    override = _folder_num_frames(folder)
  count = DEFAULT_NUM_FRAMES.get(model_type, 8) if override is None else override
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise LlavaJaxError(f"number of video frames must be a positive int, got {count!r}")
  return count


def _folder_num_frames(folder: str) -> Optional[int]:
  for name, keys in ((VIDEO_PREPROCESSOR_CONFIG, ("num_frames",)), (images_lib.PROCESSOR_CONFIG, ("num_frames",)),
                     ("config.json", ("video_num_frames", "frames_upbound"))):
    path = os.path.join(folder, name)
    settings = read_json(path) if os.path.isfile(path) else {}
    for key in keys:
      if settings.get(key):  # (frames_upbound 0 means "no bound" in LLaVA-NeXT)
        return settings[key]
  return None


def read_video(source: VideoSource, num_frames: int, max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
               name: Optional[str] = None) -> np.ndarray:
  """uint8 (num_frames, H, W, 3) RGB frames sampled uniformly from a video file, its bytes, or a frames folder."""
  if num_frames < 1:
    raise LlavaJaxError(f"number of video frames must be >= 1, got {num_frames}")
  if isinstance(source, (bytes, bytearray)):
    return _read_file(io.BytesIO(bytes(source)), num_frames, max_pixels, name or f"<{len(source)} bytes of video>")
  name = name or os.fspath(source)
  if os.path.isdir(source):
    return _read_folder(os.fspath(source), num_frames, max_pixels, name)
  if not os.path.isfile(source):
    raise LlavaJaxError(f"{name}: video file or frames folder not found")
  return _read_file(os.fspath(source), num_frames, max_pixels, name)


def _read_folder(folder: str, num_frames: int, max_pixels: int, name: str) -> np.ndarray:
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS))
  if not files:
    raise LlavaJaxError(f"{name}: no frames (no {'/'.join(FRAME_EXTENSIONS)} files in the folder)")
  frames = [np.asarray(images_lib.load_image(os.path.join(folder, files[i]), max_pixels))
            for i in sample_indices(len(files), num_frames)]
  if len({f.shape for f in frames}) != 1:
    raise LlavaJaxError(f"{name}: frames of different sizes ({', '.join(sorted({str(f.shape) for f in frames}))})")
  return np.stack(frames)


def _read_file(source, num_frames: int, max_pixels: int, name: str) -> np.ndarray:
  """Two decoding passes: the first counts the frames (containers' counts are often missing or wrong), the
  second keeps only the sampled ones, so a long video never sits in memory."""
  import av  # pylint: disable=import-outside-toplevel  (only video input needs it)

  def decoded():
    if isinstance(source, io.BytesIO):
      source.seek(0)
    with av.open(source) as container:
      if not container.streams.video:
        raise LlavaJaxError(f"{name}: no video stream")
      stream = container.streams.video[0]
      if stream.codec_context.width * stream.codec_context.height > max_pixels:
        raise LlavaJaxError(f"{name}: frames of {stream.codec_context.width}x{stream.codec_context.height} pixels, "
                            f"over the limit of {max_pixels} pixels")
      yield from container.decode(stream)

  try:
    total = sum(1 for _ in decoded())
    if total == 0:
      raise LlavaJaxError(f"{name}: no frames")
    wanted = sample_indices(total, num_frames)
    wanted_set, kept = set(wanted.tolist()), {}
    for i, frame in enumerate(decoded()):
      if i in wanted_set:
        kept[i] = frame.to_ndarray(format="rgb24")
  except av.FFmpegError as e:  # not a video, truncated, unknown codec...
    raise LlavaJaxError(f"{name}: cannot decode the video ({' '.join(str(e).split())})") from None
  if len(kept) != len(wanted_set):  # a second pass that decoded fewer frames: a damaged file
    raise LlavaJaxError(f"{name}: cannot decode the video (frames missing on a second read)")
  return np.stack([kept[i] for i in wanted])
