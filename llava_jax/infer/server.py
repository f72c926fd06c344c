"""`llava-jax serve`: an OpenAI-compatible chat server (FastAPI + uvicorn) over the batched engine.

    POST /v1/chat/completions   messages with text and `image_url` parts (data: URLs only),
                                max_tokens, temperature, top_p, seed, stop, stream (SSE)
    GET  /v1/models             the one model this server serves
    GET  /health

Request handling runs in three places: the event loop reads bodies and streams answers; a thread
pool parses, decodes images and tokenizes (CPU work that must not stall the loop); the batcher's
one worker thread owns the engine. Every user mistake is an `ApiError`, answered with a 4xx and
OpenAI's error body `{"error": {"message", "type", "code", "param"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Sequence, Union

import fastapi
import numpy as np
import pydantic
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llava_jax.data import images as images_lib
from llava_jax.data.conversation import Turn, is_text
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.batcher import Batcher, Job, Overloaded
from llava_jax.infer.generate import Prompt
from llava_jax.infer.run import Session, load_session
# The same stop-string rules as `llava-jax generate` (private there; one definition for both).
from llava_jax.infer.textstream import TextStream
from llava_jax.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for. Checked before any expensive work (images: before decoding)."""
  max_body_bytes: int = 64 * 2**20
  max_image_bytes: int = 20 * 2**20
  max_image_pixels: int = 4096 * 4096
  max_images: int = 8
  default_max_tokens: int = 512  # when the request gives none (and the context has room)


class ApiError(Exception):
  """A request the server refuses; becomes an OpenAI-style JSON error with `status`."""

  def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
               param: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


# ---- the request body ---------------------------------------------------------------------------


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


ContentPart = Annotated[Union[TextPart, ImagePart], pydantic.Field(discriminator="type")]


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


# ---- messages -> prompt -------------------------------------------------------------------------


def decode_image_url(url: str, limits: Limits) -> Image.Image:
  """A `data:image/...;base64,` URL -> RGB image. Never fetches anything."""
  if not url.startswith("data:"):
    scheme = url.split(":", 1)[0] if ":" in url else "relative"
    raise ApiError(400, f"image_url: only data: URLs are accepted (got a {scheme[:20]!r} URL); "
                   "this server fetches nothing", "unsupported_image_url", param="image_url")
  header, comma, payload = url[len("data:"):].partition(",")
  media_type = header.split(";")[0]
  if not comma or not header.endswith(";base64") or (media_type and not media_type.startswith("image/")):
    raise ApiError(400, "image_url: expected data:image/<type>;base64,<data>", "invalid_image_url",
                   param="image_url")
  if len(payload) // 4 * 3 > limits.max_image_bytes + 3:  # refuse before allocating the bytes
    raise _too_large(f"about {len(payload) // 4 * 3} bytes", f"{limits.max_image_bytes} bytes")
  try:
    data = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise ApiError(400, "image_url: the data is not valid base64", "invalid_image", param="image_url") from None
  if len(data) > limits.max_image_bytes:
    raise _too_large(f"{len(data)} bytes", f"{limits.max_image_bytes} bytes")
  try:
    with Image.open(io.BytesIO(data)) as header_only:  # reads the header, not the pixels
      width, height = header_only.size
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
    raise ApiError(400, "image_url: the data is not an image this server can decode", "invalid_image",
                   param="image_url") from None
  if width * height > limits.max_image_pixels:
    raise _too_large(f"{width}x{height} pixels", f"{limits.max_image_pixels} pixels")
  try:
    return images_lib.load_image(data, max_pixels=limits.max_image_pixels)
  except LlavaJaxError as e:
    raise ApiError(400, f"image_url: {e}", "invalid_image", param="image_url") from None


def _too_large(got: str, limit: str) -> ApiError:
  return ApiError(400, f"image_url: image is {got}, over the limit of {limit}", "image_too_large",
                  param="image_url")


def read_messages(messages: Sequence[Message], limits: Limits) -> list[Turn]:
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


# ---- output: tokens -> text deltas --------------------------------------------------------------


class RequestOutput:
  """One request's output: token ids in (worker thread), text deltas out (event loop).

  `TextStream` settles the text (held back at a possible stop string or a split UTF-8
  character), so the deltas concatenate to the final answer.
  """

  def __init__(self, decode, stop: Sequence[str], loop: asyncio.AbstractEventLoop):
    self._text = TextStream(decode, stop)
    self._loop = loop
    self.events: asyncio.Queue = asyncio.Queue()
    self._cancelled = False

  @property
  def completion_tokens(self) -> int:
    return self._text.tokens

  @property
  def cancelled(self) -> bool:
    return self._cancelled

  def cancel(self) -> None:
    self._cancelled = True

  def feed(self, tokens: np.ndarray) -> bool:
    """Sends the new text; True once a stop string ended the answer."""
    self._send(self._text.feed(tokens))
    return self._text.stopped

  def finish(self, reason: str) -> None:
    self._send(self._text.finish())
    self._put(("done", reason))

  def fail(self, error: BaseException) -> None:
    self._put(("error", error))

  def _send(self, piece: str) -> None:
    if piece:
      self._put(("text", piece))

  def _put(self, item) -> None:
    try:
      self._loop.call_soon_threadsafe(self.events.put_nowait, item)
    except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
      pass


# ---- the service ---------------------------------------------------------------------------------


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
  `config` (image_seq_length, text.max_position_embeddings), so tests can pass a stand-in.
  """

  def __init__(self, session: Session, model_id: str, *, limits: Limits = Limits(), max_batch: int = 8,
               batch_wait_ms: float = 10.0, max_queue: int = 256):
    self.session, self.model_id, self.limits = session, model_id, limits
    self.engine, self.processor = session.engine, session.processor
    self.context_length = session.engine.config.text.max_position_embeddings
    self.batcher = Batcher(self.engine, max_batch=max_batch, wait_s=batch_wait_ms / 1000, max_queue=max_queue)
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
    """Parses and checks a request body, decodes its images and tokenizes its prompt."""
    request = parse_request(body)
    if request.model != self.model_id:
      raise ApiError(404, f"model {request.model!r} does not exist; this server serves {self.model_id!r}",
                     "model_not_found", param="model")
    turns = read_messages(request.messages, self.limits)
    images = [p for t in turns for p in t.parts if not is_text(p)]
    try:
      with self._tokenizer_lock:
        inputs = self.processor.encode_conversation(turns, images, self.session.image_seq_length)
    except LlavaJaxError as e:
      raise ApiError(400, f"messages: {e}", "invalid_messages", param="messages") from None
    prompt_tokens = len(inputs.input_ids)
    room = self.context_length - prompt_tokens
    max_new = request.max_completion_tokens or request.max_tokens
    if max_new is None:
      max_new = min(self.limits.default_max_tokens, room)
    if max_new < 1 or max_new > room:
      raise ApiError(400, f"this model's context is {self.context_length} tokens; the prompt has "
                     f"{prompt_tokens} (image tokens included) and {max_new} more were asked for",
                     "context_length_exceeded", param="max_tokens")
    seed = request.seed
    sampling = SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                              repetition_penalty=request.repetition_penalty,
                              seed=0 if seed is None else seed % 2**32)
    prompt = Prompt(inputs.input_ids, inputs.pixel_values if images else None)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Prepared(prompt, prompt_tokens, max_new, sampling, seed is not None, request.stop_strings,
                    request.stream, include_usage)

  def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> RequestOutput:
    output = RequestOutput(self.decode, prepared.stop, loop)
    try:
      self.batcher.submit(Job(prepared.prompt, prepared.max_new_tokens, prepared.sampling, output, prepared.seeded))
    except Overloaded as e:
      raise ApiError(503, f"the server is busy ({e}); retry later", "overloaded", "server_error") from None
    return output


# ---- HTTP ----------------------------------------------------------------------------------------


def create_app(service: ChatService):
  """The FastAPI app; starting it starts the batcher's worker, stopping it stops the worker."""

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    service.start()
    try:
      yield
    finally:
      service.stop()

  app = fastapi.FastAPI(title="llava-jax", lifespan=lifespan)

  @app.exception_handler(ApiError)
  async def _api_error(_request, error: ApiError):
    return JSONResponse(error.body(), status_code=error.status)

  @app.exception_handler(HTTPException)
  async def _http_error(_request, error: HTTPException):  # unknown routes, wrong methods
    code = str(error.detail).lower().replace(" ", "_")
    return JSONResponse(ApiError(error.status_code, str(error.detail), code).body(),
                        status_code=error.status_code, headers=getattr(error, "headers", None))

  @app.exception_handler(Exception)
  async def _bug(_request, error: Exception):
    log.exception("unhandled error")
    return JSONResponse(ApiError(500, f"internal error ({type(error).__name__})", "internal_error",
                                 "server_error").body(), status_code=500)

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [
        {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "llava-jax"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    body = await _read_body(request, service.limits.max_body_bytes)
    prepared = await run_in_threadpool(service.prepare, body)
    output = service.submit(prepared, asyncio.get_running_loop())
    reply = _Reply(service.model_id, prepared.prompt_tokens)
    if prepared.stream:
      return StreamingResponse(reply.sse(output, prepared.include_usage), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    try:
      return JSONResponse(await reply.whole(output))
    finally:
      output.cancel()  # no-op when finished; frees the batch row if this handler was cancelled

  return app


async def _read_body(request, limit: int) -> bytes:
  declared = request.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limit:
    raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}", "request_too_large")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, f"request body is over the limit of {limit} bytes", "request_too_large")
    chunks.append(chunk)
  return b"".join(chunks)


class _Reply:
  """Builds one request's response bodies (whole or as chat.completion.chunk events)."""

  def __init__(self, model_id: str, prompt_tokens: int):
    self.id = f"chatcmpl-{uuid.uuid4().hex}"
    self.created = int(time.time())
    self.model_id, self.prompt_tokens = model_id, prompt_tokens

  def _usage(self, output: RequestOutput) -> dict:
    done = output.completion_tokens
    return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

  async def whole(self, output: RequestOutput) -> dict:
    texts = []
    async for kind, value in _events(output):
      if kind == "text":
        texts.append(value)
      elif kind == "error":
        raise ApiError(500, f"generation failed ({type(value).__name__}: {value})", "generation_failed",
                       "server_error")
      else:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                             "finish_reason": value}],
                "usage": self._usage(output)}
    raise AssertionError("unreachable: the event stream always ends with done or error")

  def _chunk(self, delta: Optional[dict], finish_reason: Optional[str] = None, **extra) -> str:
    """A chat.completion.chunk event; delta None = no choices (the final usage chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model_id, "choices": choices, **extra})

  async def sse(self, output: RequestOutput, include_usage: bool) -> AsyncIterator[str]:
    try:
      yield self._chunk({"role": "assistant", "content": ""})
      async for kind, value in _events(output):
        if kind == "text":
          yield self._chunk({"content": value})
        elif kind == "error":
          error = ApiError(500, f"generation failed ({type(value).__name__}: {value})", "generation_failed",
                           "server_error")
          yield _sse(error.body())
        else:
          yield self._chunk({}, value)
          if include_usage:
            yield self._chunk(None, usage=self._usage(output))
      yield "data: [DONE]\n\n"
    finally:
      output.cancel()  # the client may have gone away mid-answer: stop spending the batch on it


def _sse(body: Any) -> str:
  return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _events(output: RequestOutput):
  """("text", str)... then ("done", finish_reason) or ("error", exception)."""
  while True:
    kind, value = await output.events.get()
    yield kind, value
    if kind != "text":
      return


# ---- loading and running -------------------------------------------------------------------------


def load_service(model: str, *, model_id: Optional[str] = None, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 limits: Limits = Limits(), mesh=None) -> ChatService:
  """Loads a model folder (HF, llava-jax checkpoint or training workdir) as `llava-jax generate` does."""
  name = model_id or os.path.basename(os.path.normpath(os.path.abspath(model)))
  return ChatService(load_session(model, mesh), name, limits=limits, max_batch=max_batch, batch_wait_ms=batch_wait_ms)


def listen_socket(host: str, port: int) -> socket.socket:
  """A bound socket for host:port, so a busy port is a one-line error before the model loads."""
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
  except OSError as e:
    raise LlavaJaxError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
  return sock


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                  batch_wait_ms: float = 10.0, model_id: Optional[str] = None, log_level: str = "info",
                  mesh=None) -> None:
  """`llava-jax serve`: serves until interrupted (Ctrl-C / SIGTERM shut it down cleanly)."""
  import uvicorn  # pylint: disable=import-outside-toplevel
  if max_batch < 1:
    raise LlavaJaxError(f"--max-batch must be >= 1, got {max_batch}")
  if batch_wait_ms < 0:
    raise LlavaJaxError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
  if not 0 <= port <= 65535:
    raise LlavaJaxError(f"--port must be in 0..65535, got {port}")
  sock = listen_socket(host, port)
  service = load_service(model, model_id=model_id, max_batch=max_batch, batch_wait_ms=batch_wait_ms, mesh=mesh)
  server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=10))
  # uvicorn's logger is configured by now (and uvicorn names no URL when given a socket).
  logging.getLogger("uvicorn.error").info("serving model %r at http://%s:%d/v1", service.model_id, host,
                                          sock.getsockname()[1])
  # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal; make both end in a
  # KeyboardInterrupt caught here, so stopping the server is a clean exit 0, not a traceback.
  main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
  try:
    server.run(sockets=[sock])
  except KeyboardInterrupt:
    pass
  finally:
    if main:
      signal.signal(signal.SIGTERM, previous)
