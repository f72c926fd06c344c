"""A loaded model and its batcher: a request body -> a prepared prompt -> a job whose output streams back."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Sequence

from llava_jax.data.conversation import is_image, is_video
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.serve.request_batcher import RequestBatcher, Job, Overloaded
from llava_jax.infer.generate import Prompt
from llava_jax.infer.run import Session
from llava_jax.infer.sampling import SamplingParams
from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.limits import Limits
from llava_jax.infer.serve.messages import read_messages
from llava_jax.infer.serve.output import RequestOutput
from llava_jax.infer.serve.request import ChatRequest, parse_request
from llava_jax.infer.serve.videos import decode_video_url


@dataclasses.dataclass
class Prepared:
  """A validated request, ready for the batcher."""
  prompt: Prompt
  prompt_tokens: int
  max_new_tokens: int
  sampling: SamplingParams
  seeded: bool
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool


class ChatService:
  """A loaded model (`run.Session`: engine and processor) and its batcher, behind HTTP.

  The session's engine only needs `stream(prompts, max_new_tokens, params)`, `eos_token_ids` and
  `config` (text.max_position_embeddings), so tests can pass a stand-in. `media_dir`: the folder video_url parts
  may name local files in (--allow-local-media; None: data: URLs only).
  """

  def __init__(self, session: Session, model_id: str, *, limits: Limits = Limits(), max_batch: int = 8,
               batch_wait_ms: float = 10.0, max_queue: int = 256, media_dir: str | None = None):
    self.session, self.model_id, self.limits, self.media_dir = session, model_id, limits, media_dir
    self.engine, self.processor = session.engine, session.processor
    self.context_length = session.engine.config.text.max_position_embeddings
    self.batcher = RequestBatcher(self.engine, max_batch=max_batch, wait_s=batch_wait_ms / 1000, max_queue=max_queue)
    self.created = int(time.time())
    # One tokenizer, used from the request threads and the worker: calls into it are serialized.
    self._tokenizer_lock = threading.Lock()

  def start(self) -> None:
    self.batcher.start()

  def stop(self) -> None:
    self.batcher.stop()

  def decode(self, ids: Sequence[int]) -> str:
    with self._tokenizer_lock:
      return self.processor.decode(ids)

  def prepare(self, body: bytes) -> Prepared:
    """Parses and checks a request body, decodes its images and videos and tokenizes its prompt."""
    request = parse_request(body)
    if request.model != self.model_id:
      raise ApiError(404, f"model {request.model!r} does not exist; this server serves {self.model_id!r}",
                     "model_not_found", param="model")
    turns = read_messages(request.messages, self.limits, self._decode_video)
    images = [p for t in turns for p in t.parts if is_image(p)]
    videos = [p.frames for t in turns for p in t.parts if is_video(p)]
    try:
      with self._tokenizer_lock:
        inputs = self.processor.encode_conversation(turns, images, videos=videos)
    except LlavaJaxError as e:
      raise ApiError(400, f"messages: {e}", "invalid_messages", param="messages") from None
    prompt_tokens = len(inputs.input_ids)
    seed = request.seed
    sampling = SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                              repetition_penalty=request.repetition_penalty,
                              seed=0 if seed is None else seed % 2**32)
    prompt = Prompt.of(inputs)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Prepared(prompt, prompt_tokens, self._max_new_tokens(request, prompt_tokens), sampling, seed is not None,
                    request.stop_strings, request.stream, include_usage)

  def _decode_video(self, url: str):
    return decode_video_url(url, self.limits, self.session.num_frames, self.media_dir)

  def _max_new_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
    """What the request asks for (else the default), if the context has room for it."""
    room = self.context_length - prompt_tokens
    max_new = request.max_completion_tokens or request.max_tokens
    if max_new is None:
      max_new = min(self.limits.default_max_tokens, room)
    if max_new < 1 or max_new > room:
      raise ApiError(400, f"this model's context is {self.context_length} tokens; the prompt has "
                     f"{prompt_tokens} (image tokens included) and {max_new} more were asked for",
                     "context_length_exceeded", param="max_tokens")
    return max_new

  def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> RequestOutput:
    output = RequestOutput(self.decode, prepared.stop, loop)
    try:
      self.batcher.submit(Job(prepared.prompt, prepared.max_new_tokens, prepared.sampling, output, prepared.seeded))
    except Overloaded as e:
      raise ApiError(503, f"the server is busy ({e}); retry later", "overloaded", "server_error") from None
    return output
