"""A request's messages -> the conversation turns the model folder renders (data/conversation.py)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from llava_jax.data.conversation import Turn, Video
from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.images import decode_image_url
from llava_jax.infer.serve.limits import Limits
from llava_jax.infer.serve.request import ImagePart, Message, TextPart


def read_messages(messages: Sequence[Message], limits: Limits,
                  decode_video: Callable[[str], np.ndarray]) -> list[Turn]:
  """Turns whose parts are text, decoded images and videos (`decode_video`: a video_url -> its sampled frames), in
  the order the messages give them."""
  turns, counts = [], {"image": 0, "video": 0}
  for i, message in enumerate(messages):
    parts: list = []
    content = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
    for part in content:
      if isinstance(part, TextPart):
        parts.append(part.text)
        continue
      kind = "image" if isinstance(part, ImagePart) else "video"
      if message.role != "user":
        raise ApiError(400, f"messages.{i}: only user messages may contain {kind}s", "invalid_value",
                       param=f"messages.{i}.content")
      counts[kind] += 1
      most = limits.max_images if kind == "image" else limits.max_videos
      if counts[kind] > most:
        raise ApiError(400, f"at most {most} {kind}s per request", f"too_many_{kind}s", param="messages")
      if kind == "image":
        parts.append(decode_image_url(part.image_url.url, limits))
      else:
        parts.append(Video(decode_video(part.video_url.url)))
    turns.append(Turn("system" if message.role == "developer" else message.role, tuple(parts)))
  if turns[-1].role != "user":
    raise ApiError(400, "the last message must be from the user", "invalid_value", param="messages")
  return turns
