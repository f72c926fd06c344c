"""One request's answer as OpenAI sends it: a whole chat.completion, or chat.completion.chunk events (SSE)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.output import RequestOutput


class Reply:
  """Builds one request's response bodies from its output's events."""

  def __init__(self, model_id: str, prompt_tokens: int):
    self.id = f"chatcmpl-{uuid.uuid4().hex}"
    self.created = int(time.time())
    self.model_id, self.prompt_tokens = model_id, prompt_tokens

  async def whole(self, output: RequestOutput) -> dict:
    texts = []
    async for kind, value in output.until_end():
      if kind == "text":
        texts.append(value)
      elif kind == "error":
        raise _generation_failed(value)
      else:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                             "finish_reason": value}],
                "usage": self._usage(output)}
    raise AssertionError("unreachable: the event stream always ends with done or error")

  async def sse(self, output: RequestOutput, include_usage: bool) -> AsyncIterator[str]:
    try:
      yield self._chunk({"role": "assistant", "content": ""})
      async for kind, value in output.until_end():
        if kind == "text":
          yield self._chunk({"content": value})
        elif kind == "error":
          yield _sse(_generation_failed(value).body())
        else:
          yield self._chunk({}, value)
          if include_usage:
            yield self._chunk(None, usage=self._usage(output))
      yield "data: [DONE]\n\n"
    finally:
      output.cancel()  # the client may have gone away mid-answer: stop spending the batch on it

  def _chunk(self, delta: Optional[dict], finish_reason: Optional[str] = None, **extra) -> str:
    """A chat.completion.chunk event; delta None = no choices (the final usage chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model_id, "choices": choices, **extra})

  def _usage(self, output: RequestOutput) -> dict:
    done = output.completion_tokens
    return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}


def _generation_failed(error: BaseException) -> ApiError:
  return ApiError(500, f"generation failed ({type(error).__name__}: {error})", "generation_failed", "server_error")


def _sse(body: Any) -> str:
  return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
