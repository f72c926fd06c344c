"""Packing preprocessed samples into the rows of a batch (`data.packing`): which sample goes to which row
(first fit, in pipeline order), and one row's arrays built from its samples.

A packed row holds its samples one after another: its attention mask holds segment ids (the row's k-th sample's
tokens are k, padding 0; the model keeps attention within a sample and restarts positions, models/llava.py), the
loss masks stay each sample's own (whose first token is never a target, so nothing is predicted across a
boundary), and the samples' tower inputs follow one another, each sample's feature index shifted past the tiles
of the samples before it (OneVision's blends of features: every tap's index shifted, the weights kept). Unpacked
rows are the case of one sample per row.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from llava_jax.data import layouts
from llava_jax.data.layouts import FEATURE_INDEX, FEATURE_WEIGHTS


def sample_tokens(sample: dict) -> int:
  return len(sample["input_ids"])


def sample_tiles(sample: dict) -> int:
  return len(sample["pixel_values"])


class FirstFitRows:
  """`rows` rows of at most `max_tokens` tokens and `max_tiles` tower inputs (and at most `samples_per_row`
  samples; None = no limit); each sample goes to the first row it fits in."""

  def __init__(self, rows: int, max_tokens: int, max_tiles: int, samples_per_row: Optional[int] = None):
    self.rows: List[List[dict]] = [[] for _ in range(rows)]
    self.max_tokens, self.max_tiles, self.samples_per_row = max_tokens, max_tiles, samples_per_row
    self._tokens, self._tiles = [0] * rows, [0] * rows

  def _fits(self, row: int, tokens: int, tiles: int) -> bool:
    if self.samples_per_row is not None and len(self.rows[row]) >= self.samples_per_row:
      return False
    return self._tokens[row] + tokens <= self.max_tokens and self._tiles[row] + tiles <= self.max_tiles

  def place(self, sample: dict) -> bool:
    """Adds `sample` to the first row with room for it; False (and nothing changes) when no row has."""
    tokens, tiles = sample_tokens(sample), sample_tiles(sample)
    row = next((r for r in range(len(self.rows)) if self._fits(r, tokens, tiles)), None)
    if row is None:
      return False
    self.rows[row].append(sample)
    self._tokens[row] += tokens
    self._tiles[row] += tiles
    return True

  def full(self) -> bool:
    """True when no row can take even a one-token sample without images."""
    return not any(self._fits(r, 1, 0) for r in range(len(self.rows)))


def pack_row(samples: Sequence[dict], tokens_per_tile: int) -> Dict[str, np.ndarray]:
  """One row's unpadded arrays: the samples' tokens, segment ids (1..n), loss masks and tower inputs one after
  another, and (where the samples have them) their feature indexes, each shifted past the tiles of the samples
  before it, and their feature weights."""
  row = {
      "input_ids": np.concatenate([s["input_ids"] for s in samples]),
      "attention_mask": np.concatenate([np.full(sample_tokens(s), k + 1, np.int32) for k, s in enumerate(samples)]),
      "loss_mask": np.concatenate([s["loss_mask"] for s in samples]),
      "pixel_values": np.concatenate([s["pixel_values"] for s in samples]),
  }
  if FEATURE_WEIGHTS in samples[0]:
    row[FEATURE_WEIGHTS] = np.concatenate([s[FEATURE_WEIGHTS] for s in samples])
  if FEATURE_INDEX in samples[0]:
    tiles_before = np.cumsum([0] + [sample_tiles(s) for s in samples[:-1]])
    row[FEATURE_INDEX] = np.concatenate([layouts.shift_feature_index(s[FEATURE_INDEX], int(t), tokens_per_tile)
                                         for s, t in zip(samples, tiles_before)])
  return row
