"""Training samples with a `video` (LLaVA-Video's format, data/llava_json.py) -> the pieces of a training example,
made as inference makes a `<video>` (data/processor.Processor.encode): the video decoded and sampled to the model's
frame count (data/video_io.py), its `<image>` placeholder expanded to the video's tokens, its frames preprocessed and
indexed by the model's video layout (data/video.py)."""

from __future__ import annotations

import dataclasses
from typing import Union

from llava_jax.data import llava_json
from llava_jax.data.llava_json import Sample, Skipped, SkipReason
from llava_jax.data.templates import IMAGE_TAG
from llava_jax.data.video import VideoLayout
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import check_image_tokens


@dataclasses.dataclass(frozen=True)
class VideoSamples:
  """A video model's way with video samples: its video layout, frame count and video token."""
  layout: VideoLayout
  num_frames: int
  token: str
  token_id: int

  def example(self, sample: Sample, preprocess) -> Union[dict, Skipped]:
    """The training example of a video sample, or why it is skipped; `preprocess` is the pipeline's Preprocess
    (its template, limits and image processor)."""
    frames = llava_json.read_video_frames(sample, self.num_frames, preprocess.max_pixels)
    if isinstance(frames, Skipped):
      return frames
    try:
      self.layout.check_frames(len(frames), sample.video)
    except LlavaJaxError as e:  # more video tokens than the model's positions
      return Skipped(sample.id, SkipReason.CORRUPT_VIDEO, str(e))
    if len(frames) > preprocess.max_tiles:
      return Skipped(sample.id, SkipReason.TOO_MANY_IMAGES,
                     f"{len(frames)} frames > data.max_tiles {preprocess.max_tiles}")
    count = self.layout.num_video_tokens(len(frames))
    turns = [(role, text.replace(IMAGE_TAG, self.token * count)) for role, text in sample.turns]
    input_ids, loss_mask = preprocess.encode(turns, [])
    loss_mask[input_ids == self.token_id] = 0.0  # as image tokens: never a target
    if len(input_ids) > preprocess.max_len:
      return Skipped(sample.id, SkipReason.TOO_LONG,
                     f"{len(input_ids)} tokens (with {count} video tokens) > data.max_len {preprocess.max_len}")
    try:
      check_image_tokens(input_ids, self.token_id, count, f"sample {sample.id}", "video tokens")
    except LlavaJaxError as e:  # the template dropped the video's tokens, or the tokenizer merged them
      return Skipped(sample.id, SkipReason.IMAGE_COUNT, str(e))
    example = {"id": sample.id, "input_ids": input_ids, "loss_mask": loss_mask,
               "pixel_values": self.layout.pixels(frames, preprocess.image_processor, sample.video)}
    return preprocess.with_feature_index(example, self.layout.feature_index(len(frames)))
