"""The FastAPI app: the routes, and every error as OpenAI's JSON error body."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import fastapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llava_jax.infer.serve.errors import ApiError
from llava_jax.infer.serve.responses import Reply
from llava_jax.infer.serve.service import ChatService

log = logging.getLogger(__name__)


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
    prepared = await run_in_threadpool(service.prepare, body)  # CPU work off the event loop
    output = service.submit(prepared, asyncio.get_running_loop())
    reply = Reply(service.model_id, prepared.prompt_tokens)
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
