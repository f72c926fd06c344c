"""The body of POST /v1/chat/completions: its schema (OpenAI's, the parts this server supports) and parsing."""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

import pydantic

from llava_jax.infer.serve.errors import ApiError

MAX_STOP_STRINGS = 4  # as OpenAI


class _Strict(pydantic.BaseModel):
  # Unknown fields (user, logprobs=false, ...) are ignored as OpenAI clients send many; known ones
  # are type-checked strictly ("5" is not a number).
  model_config = pydantic.ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ImageURL(_Strict):
  url: str
  detail: Optional[str] = None


class ImagePart(_Strict):
  type: Literal["image_url"]
  image_url: ImageURL


class VideoURL(_Strict):
  url: str


class VideoPart(_Strict):
  type: Literal["video_url"]
  video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], pydantic.Field(discriminator="type")]


class Message(_Strict):
  role: Literal["system", "developer", "user", "assistant"]
  content: Union[str, list[ContentPart]]


class StreamOptions(_Strict):
  include_usage: bool = False


class ChatRequest(_Strict):
  model: str
  messages: list[Message] = pydantic.Field(min_length=1)
  max_tokens: Optional[int] = pydantic.Field(None, ge=1)
  max_completion_tokens: Optional[int] = pydantic.Field(None, ge=1)  # OpenAI's newer name
  temperature: float = pydantic.Field(1.0, ge=0, le=2)  # OpenAI's default: sampling, not greedy
  top_p: float = pydantic.Field(1.0, gt=0, le=1)
  top_k: int = pydantic.Field(0, ge=0)  # extensions that vLLM also accepts
  repetition_penalty: float = pydantic.Field(1.0, gt=0)
  seed: Optional[int] = None
  stop: Union[str, list[str], None] = None
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  n: int = pydantic.Field(1, ge=1, le=1)

  @pydantic.field_validator("stop")
  @classmethod
  def _check_stop(cls, stop):
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > MAX_STOP_STRINGS:
      raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
      raise ValueError("stop strings must not be empty")
    return stops

  @property
  def stop_strings(self) -> tuple[str, ...]:
    return tuple(self.stop or ())


def parse_request(body: bytes) -> ChatRequest:
  try:
    data = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise ApiError(400, f"request body is not valid JSON ({e})", "invalid_json") from None
  if not isinstance(data, dict):
    raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", "invalid_json")
  try:
    return ChatRequest.model_validate(data)
  except pydantic.ValidationError as e:
    raise _validation_error(e) from None


def _validation_error(error: pydantic.ValidationError) -> ApiError:
  """The first few problems as `field.path: message`, without pydantic's union-branch names."""
  problems, first_param = [], None
  for item in error.errors(include_url=False):
    path = ".".join(str(p) for p in item["loc"] if isinstance(p, int) or ("[" not in p and p not in _TYPE_NAMES))
    first_param = first_param or path
    text = f"{path}: {item['msg']}" if path else item["msg"]
    if text not in problems:
      problems.append(text)
  return ApiError(400, "; ".join(problems[:3]), "invalid_value", param=first_param)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}
