"""`llava-jax serve`: checks the flags, binds the socket, loads the model, then runs uvicorn until stopped."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Optional

from llava_jax.errors import LlavaJaxError
from llava_jax.infer.run import load_session
from llava_jax.infer.serve.app import create_app
from llava_jax.infer.serve.limits import Limits
from llava_jax.infer.serve.service import ChatService


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                  batch_wait_ms: float = 10.0, model_id: Optional[str] = None, log_level: str = "info",
                  mesh=None, adapter: Optional[str] = None, num_frames: Optional[int] = None,
                  allow_local_media: Optional[str] = None, dtype: str = "auto") -> None:
  """`llava-jax serve`: serves until interrupted (Ctrl-C / SIGTERM shut it down cleanly)."""
  import uvicorn  # pylint: disable=import-outside-toplevel
  if max_batch < 1:
    raise LlavaJaxError(f"--max-batch must be >= 1, got {max_batch}")
  if batch_wait_ms < 0:
    raise LlavaJaxError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
  if not 0 <= port <= 65535:
    raise LlavaJaxError(f"--port must be in 0..65535, got {port}")
  if num_frames is not None and num_frames < 1:
    raise LlavaJaxError(f"--num-frames must be >= 1, got {num_frames}")
  if allow_local_media is not None and not os.path.isdir(allow_local_media):
    raise LlavaJaxError(f"--allow-local-media {allow_local_media}: no such folder")
  sock = listen_socket(host, port)
  service = load_service(model, model_id=model_id, max_batch=max_batch, batch_wait_ms=batch_wait_ms, mesh=mesh,
                         adapter=adapter, num_frames=num_frames, media_dir=allow_local_media, dtype=dtype)
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


def load_service(model: str, *, model_id: Optional[str] = None, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 limits: Limits = Limits(), mesh=None, adapter: Optional[str] = None, num_frames: Optional[int] = None,
                 media_dir: Optional[str] = None, dtype: str = "auto") -> ChatService:
  """Loads a model folder (HF, llava-jax checkpoint or training workdir), with a LoRA `adapter`, as
  `llava-jax generate` does."""
  name = model_id or os.path.basename(os.path.normpath(os.path.abspath(model)))
  return ChatService(load_session(model, mesh, adapter, num_frames, dtype), name, limits=limits, max_batch=max_batch,
                     batch_wait_ms=batch_wait_ms, media_dir=media_dir)
