"""LLaVA JSON / JSONL + image folder -> samples, with a typed reason for every unusable one.

The format is that of `blip_laion_cc_sbu_558k.json` and `llava_v1_5_mix665k.json`:
`[{"id", "image": str | [str] | absent, "conversations": [{"from": "human"|"gpt", "value"}]}]`, and LLaVA-Video's
(LLaVA-Video-178K, LLaVA-NeXT's train.py): `{"id", "video": path relative to data.video_folder, "conversations"}`
whose human turn holds one `<image>` (or `<video>`) standing for the video (added before the first turn when absent);
a record with an `image` is an image sample, as LLaVA-NeXT reads it.

Loading only checks that the file is JSON (anything else is a LlavaJaxError, exit 2) and keeps
every record as its raw JSON bytes in one buffer with an offsets index: memory stays about the
file's size, the source pickles quickly into grain workers, and per-host shards are cheap.
Each record is validated when it is used (`parse_sample`, then `read_images`), inside the data
workers, so a 665k-sample file loads in seconds and a bad sample costs one skip, not a crash.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from llava_jax.data import images as images_lib
from llava_jax.data.templates import GPT, HUMAN, IMAGE_TAG, VIDEO_TAG
from llava_jax.data.video_io import read_video
from llava_jax.errors import LlavaJaxError

_ROLES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}


class SkipReason(str, enum.Enum):
  MISSING_IMAGE = "missing_image"
  CORRUPT_IMAGE = "corrupt_image"
  MALFORMED = "malformed_conversation"
  IMAGE_COUNT = "image_count_mismatch"
  TOO_LONG = "too_long"
  TOO_MANY_IMAGES = "too_many_images"
  VIDEO = "video_not_supported"  # a `video` sample for a model that takes no videos
  MISSING_VIDEO = "missing_video"
  CORRUPT_VIDEO = "corrupt_video"  # cannot be decoded, no frames, or more tokens than the model takes


@dataclasses.dataclass(frozen=True)
class Skipped:
  """An unusable sample: its id, why, and a short human-readable detail."""
  id: str
  reason: SkipReason
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class Sample:
  """A structurally valid sample. `images` are file paths or encoded bytes (one per `<image>`),
  `turns` are (role, text) with role "human"/"gpt" and the `<image>` tags in place; a video sample has no images,
  its `video` path and one `<image>` (the video's place)."""
  id: str
  images: Tuple[Union[str, bytes], ...]
  turns: Tuple[Tuple[str, str], ...]
  video: Optional[str] = None


class RecordSource:
  """Random access to raw records (grain's data-source protocol: `len` and `[i]`).

  `[i]` is `{"record": <parsed JSON value>, "index": <position in the file>}`.
  """

  def __init__(self, buffer: np.ndarray, offsets: np.ndarray, indices: np.ndarray, name: str):
    self._buffer, self._offsets, self._indices, self.name = buffer, offsets, indices, name

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    raw = self._buffer[self._offsets[i]:self._offsets[i + 1]].tobytes()
    return {"record": json.loads(raw), "index": int(self._indices[i])}

  def __repr__(self) -> str:
    return f"RecordSource({self.name!r}, {len(self)} records)"

  def shard(self, index: int, count: int) -> "RecordSource":
    """Records whose file position is `index` mod `count` (one host's share), compacted."""
    keep = np.arange(index, len(self), count)
    starts, ends = self._offsets[keep], self._offsets[keep + 1]
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    buffer = (np.concatenate([self._buffer[s:e] for s, e in zip(starts, ends)])
              if len(keep) else np.zeros(0, np.uint8))
    return RecordSource(buffer, offsets, self._indices[keep], self.name)


def _pack(chunks: List[bytes], name: str) -> RecordSource:
  lengths = np.fromiter((len(c) for c in chunks), np.int64, len(chunks))
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  buffer = np.frombuffer(b"".join(chunks), np.uint8)
  return RecordSource(buffer, offsets, np.arange(len(chunks), dtype=np.int64), name)


def load_llava_json(path: Union[str, os.PathLike]) -> RecordSource:
  """Reads a JSON array (loaded once) or JSONL (streamed line by line) of records."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise LlavaJaxError(f"data.json: {path}: file not found")
  try:
    with open(path, "rb") as f:
      head = f.read(4096).lstrip()
  except OSError as e:
    raise LlavaJaxError(f"data.json: {path}: cannot read ({e})") from None
  if head.startswith(b"\xef\xbb\xbf"):
    head = head[3:].lstrip()
  if head.startswith(b"["):
    return _pack(_json_array_records(path), path)
  if head.startswith(b"{"):
    return _pack(_jsonl_records(path), path)
  raise LlavaJaxError(f"data.json: {path}: not LLaVA JSON (expected a JSON array or JSON lines of objects)")


def _json_array_records(path: str) -> List[bytes]:
  """Splits a JSON array into its elements' raw text without building all objects at once."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise LlavaJaxError(f"data.json: {path}: cannot read ({e})") from None
  decoder = json.JSONDecoder()
  chunks, pos, n = [], text.index("[") + 1, len(text)
  expect_value = True
  try:
    while True:
      while pos < n and text[pos] in " \t\r\n":
        pos += 1
      if pos < n and text[pos] == "]" and (not chunks or not expect_value):
        break
      if not expect_value:  # after a value: a comma, then the next value
        if pos >= n or text[pos] != ",":
          raise ValueError(f"expected ',' or ']' at character {pos}")
        pos += 1
        expect_value = True
        continue
      _, end = decoder.raw_decode(text, pos)
      chunks.append(text[pos:end].encode("utf-8"))
      pos, expect_value = end, False
    if text[pos + 1:].strip():
      raise ValueError(f"extra data after the array at character {pos + 1}")
  except (ValueError, IndexError) as e:
    raise LlavaJaxError(f"data.json: {path}: invalid JSON ({e})") from None
  return chunks


def _jsonl_records(path: str) -> List[bytes]:
  chunks = []
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      line = line.strip()
      if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
      if not line:
        continue
      try:
        json.loads(line)
      except ValueError as e:
        raise LlavaJaxError(f"data.json: {path}: line {line_no}: invalid JSON ({e})") from None
      chunks.append(line)
  return chunks


def sample_id(record, index: int) -> str:
  if isinstance(record, dict) and record.get("id") is not None:
    return str(record["id"])
  return f"#{index}"


def image_names(record: dict) -> Optional[List[str]]:
  """The record's image paths as written ([] when absent), or None when `image` is malformed."""
  image = record.get("image")
  if image is None:
    return []
  if isinstance(image, str) and image:
    return [image]
  if isinstance(image, list) and all(isinstance(p, str) and p for p in image):
    return list(image)
  return None


def parse_sample(record, index: int, image_folder: str = "",
                 image_data: Optional[Sequence[bytes]] = None, video_folder: str = "") -> Union[Sample, Skipped]:
  """Validates one raw record's structure (no I/O). `image_data`, when given, replaces the
  image files (TFDS stores their bytes, b"" for a file that was missing)."""
  sid = sample_id(record, index)

  def skip(reason, detail):
    return Skipped(sid, reason, detail)

  if not isinstance(record, dict):
    return skip(SkipReason.MALFORMED, f"record is {type(record).__name__}, expected an object")
  video = record.get("video") if "image" not in record else None
  if video is not None and not (isinstance(video, str) and video):
    return skip(SkipReason.MALFORMED, f"'video' must be a path, got {video!r:.80}")
  names = image_names(record) if video is None else [video]
  if names is None:
    return skip(SkipReason.MALFORMED, f"'image' must be a path or a list of paths, got {record['image']!r:.80}")
  turns = _turns(record.get("conversations"))
  if isinstance(turns, str):
    return skip(SkipReason.MALFORMED, turns)
  if video is not None:  # a <video> tag (not LLaVA-Video's own) marks the video's place as well
    turns = [(role, text.replace(VIDEO_TAG, IMAGE_TAG)) for role, text in turns]
  tags = sum(text.count(IMAGE_TAG) for role, text in turns if role == HUMAN)
  if tags == 0 and names:
    # LLaVA's default placement: the images open the first human turn.
    turns[0] = (HUMAN, f"{IMAGE_TAG}\n" * len(names) + turns[0][1])
  elif tags != len(names):
    given = "video" if video else "image(s)"
    return skip(SkipReason.IMAGE_COUNT, f"{tags} {IMAGE_TAG} tag(s) but {len(names)} {given}")
  if video is not None:
    return Sample(sid, (), tuple(turns), os.path.join(video_folder, video))
  if image_data is not None:
    if len(image_data) != len(names):
      return skip(SkipReason.IMAGE_COUNT, f"{len(names)} image name(s) but {len(image_data)} stored image(s)")
    sources = tuple(bytes(b) for b in image_data)
  else:
    sources = tuple(os.path.join(image_folder, p) for p in names)
  return Sample(sid, sources, tuple(turns))


def _turns(conversations):
  """[(role, text)] alternating human/gpt, or a string saying what is wrong."""
  if not isinstance(conversations, list) or not conversations:
    return "'conversations' must be a non-empty list"
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      return f"turn {i} must be an object with a string 'value'"
    role = _ROLES.get(turn.get("from"))
    expected = HUMAN if i % 2 == 0 else GPT
    if role != expected:
      return f"turn {i} is from {turn.get('from')!r}, expected {expected} (turns alternate human/gpt)"
    if role == GPT and IMAGE_TAG in turn["value"]:
      return f"turn {i}: an answer contains {IMAGE_TAG}"
    turns.append((role, turn["value"]))
  if len(turns) % 2:
    return f"{len(turns)} turns: the conversation must end with a gpt answer"
  return turns


def read_video_frames(sample: Sample, num_frames: int, max_pixels: int = images_lib.DEFAULT_MAX_PIXELS):
  """Decodes a video sample's video, sampled to `num_frames` -> uint8 (F, H, W, 3), or Skipped."""
  if not os.path.exists(sample.video):
    return Skipped(sample.id, SkipReason.MISSING_VIDEO, f"{sample.video}: file not found")
  try:
    return read_video(sample.video, num_frames, max_pixels)
  except LlavaJaxError as e:
    return Skipped(sample.id, SkipReason.CORRUPT_VIDEO, str(e))


def read_images(sample: Sample, max_pixels: int = images_lib.DEFAULT_MAX_PIXELS):
  """Decodes a sample's images -> list of RGB PIL images, or Skipped (missing / corrupt)."""
  out = []
  for source in sample.images:
    if isinstance(source, bytes) and not source:
      return Skipped(sample.id, SkipReason.MISSING_IMAGE, "image file was missing when the dataset was built")
    if isinstance(source, str) and not os.path.isfile(source):
      return Skipped(sample.id, SkipReason.MISSING_IMAGE, f"{source}: file not found")
    try:
      out.append(images_lib.load_image(source, max_pixels))
    except LlavaJaxError as e:
      return Skipped(sample.id, SkipReason.CORRUPT_IMAGE, str(e))
  return out
