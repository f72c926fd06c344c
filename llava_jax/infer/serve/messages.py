"""A request's messages -> the conversation turns the model folder renders (data/conversation.py)."""

from __future__ import annotations

from typing import Sequence

from llava_jax.data.conversation import Turn
from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.images import decode_image_url
from llava_jax.infer.serve.limits import Limits
from llava_jax.infer.serve.request import Message, TextPart


def read_messages(messages: Sequence[Message], limits: Limits) -> list[Turn]:
  """Turns whose parts are text and decoded images, in the order the messages give them."""
  turns, count = [], 0
  for i, message in enumerate(messages):
    parts: list = []
    content = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
    for part in content:
      if isinstance(part, TextPart):
        parts.append(part.text)
        continue
      if message.role != "user":
        raise ApiError(400, f"messages.{i}: only user messages may contain images", "invalid_value",
                       param=f"messages.{i}.content")
      count += 1
      if count > limits.max_images:
        raise ApiError(400, f"at most {limits.max_images} images per request", "too_many_images",
                       param="messages")
      parts.append(decode_image_url(part.image_url.url, limits))
    turns.append(Turn("system" if message.role == "developer" else message.role, tuple(parts)))
  if turns[-1].role != "user":
    raise ApiError(400, "the last message must be from the user", "invalid_value", param="messages")
  return turns
