"""The two seams of a LLaVA model: the vision tower and the language model (decoder).

`models/llava.py` builds both from the config's model types (its VISION_TOWERS and
LANGUAGE_MODELS tables); a new family is one module that keeps one of these contracts, its rows
in those tables, in config.VISION_FAMILIES / TEXT_FAMILIES and in weights/mapping.py.
"""

from __future__ import annotations

from typing import Protocol

import jax

from llava_jax.models.attention import AttentionMask


class VisionTower(Protocol):
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, ...]:
    """pixel_values (N, H, W, C) -> the hidden states at LlavaConfig.feature_layers, each (N, tokens, D)."""


class LanguageModel(Protocol):
  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token ids (B, S) -> embeddings (B, S, D)."""

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, mask: AttentionMask, cache=None,
               cache_index: jax.Array | int = 0, last_logits_only: bool = False) -> tuple[jax.Array, object]:
    """Embeddings (B, S, D), positions (B, S), mask over the T key slots (models/attention.py) -> float32
    logits and the cache."""
