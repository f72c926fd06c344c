"""The one rule between a prompt row's image tokens and its images' features, shared by the data
side (processor, training pipeline, generation engine) and the model's own host-side check."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from llava_jax.errors import LlavaJaxError


def check_image_tokens(input_ids, image_token_id: int | Sequence[int], num_features: int, where: str,
                       images: str = "images") -> None:
  """The one rule between a row's tokens and its images: each image token takes one of the features its images
  give (by the row's feature index, or in order), so there are exactly as many image tokens as features. With
  several ids (a model's <image> and <video>, LlavaConfig.media_token_ids) a token of either kind counts."""
  found = int(np.sum(np.isin(np.asarray(input_ids), image_token_id)))
  if found != num_features:
    raise LlavaJaxError(f"{where}: {found} image tokens but its {images} give {num_features} image features")


# A feature index's entries: i >= 0 is feature i of the row's tower inputs' features (tokens_per_tile each), -1
# the image_newline embedding, and -2 - i the tower-pooled feature i (llava_next_video: tower input i //
# tokens_per_tile's spatially pooled feature i % tokens_per_tile, pooled before the projector; models/llava.py).
# Negative entries keep their meaning whatever the row's number of tower inputs.
POOLED_BASE = -2


def pooled_index(index):
  """The entries that take the tower-pooled features at `index` (numbered as plain features are)."""
  return (POOLED_BASE - np.asarray(index)).astype(np.int32)


# Features one image token of a FeatureMix can blend: bilinear interpolation's 2x2 neighbours.
MIX_TAPS = 4


class FeatureMix(NamedTuple):
  """Image tokens that each take a weighted sum of features instead of one (LLaVA-OneVision's bilinear downscaling
  of large images): index int32 (..., K, MIX_TAPS), entries as a plain feature index's (-1: the image_newline
  embedding), weights float32 (..., K, MIX_TAPS). The data side computes both, so the model stays a static gather."""
  index: np.ndarray
  weights: np.ndarray


def as_mix(index) -> FeatureMix:
  """A plain feature index (..., K) as the FeatureMix giving the same features: each token's one feature, weight 1."""
  if isinstance(index, FeatureMix):
    return index
  index = np.asarray(index, np.int32)
  weights = np.zeros(index.shape + (MIX_TAPS,), np.float32)
  weights[..., 0] = 1
  return FeatureMix(np.repeat(index[..., None], MIX_TAPS, axis=-1), weights)
