"""One request's output: token ids in (the batcher's worker thread), text deltas out (the event loop)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

import numpy as np

from llava_jax.infer.textstream import TextStream


class RequestOutput:
  """The batcher's sink for one request (see batcher.Sink), read back as events on the event loop.

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

  # ---- the worker thread's side

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

  # ---- the event loop's side

  async def until_end(self) -> AsyncIterator[tuple]:
    """("text", str)... then ("done", finish_reason) or ("error", exception)."""
    while True:
      kind, value = await self.events.get()
      yield kind, value
      if kind != "text":
        return
