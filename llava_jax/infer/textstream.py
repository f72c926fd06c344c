"""Tokens arriving in chunks -> text pieces that will not change, with stop strings honored."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence


def first_stop(text: str, stop: Sequence[str]) -> int | None:
  hits = [text.find(s) for s in stop if s and s in text]
  return min(hits) if hits else None


def partial_stop_len(text: str, stop: Sequence[str]) -> int:
  """Length of the longest suffix of text that is a proper prefix of some stop string."""
  best = 0
  for s in stop:
    for n in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:n]):
        best = n
        break
  return best


class TextStream:
  """Incremental detokenization shared by `generate` and the server.

  The text so far is re-decoded on every chunk (tokenizers merge pieces, e.g. SentencePiece's
  leading space), and text that might still change is held back: a trailing incomplete UTF-8
  character and a suffix that could start a stop string. Text from a stop string on is dropped.
  """

  def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
    self._decode, self._stop = decode, tuple(stop)
    self._ids: list[int] = []
    self._sent = 0  # characters of the decoded text already returned
    self.stopped = False
    self.tokens = 0

  def feed(self, tokens: Iterable[int]) -> str:
    """The new settled text after these tokens ("" if none); sets `stopped` at a stop string."""
    self._ids.extend(int(t) for t in tokens)
    self.tokens = len(self._ids)
    text = self._decode(self._ids)
    cut = first_stop(text, self._stop)
    if cut is not None:
      self.stopped = True
      return self._take(text, cut)
    return self._take(text, len(text.rstrip("\ufffd")) - partial_stop_len(text, self._stop))

  def finish(self) -> str:
    """What is left once generation has ended (nothing after a stop string)."""
    if self.stopped:
      return ""
    text = self._decode(self._ids)
    return self._take(text, len(text))

  def _take(self, text: str, end: int) -> str:
    if end <= self._sent:
      return ""
    piece, self._sent = text[self._sent:end], end
    return piece
