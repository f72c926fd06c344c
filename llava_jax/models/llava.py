"""LLaVA: vision tower -> selected features -> projector -> image-token embeddings -> language model."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.errors import LlavaJaxError
from llava_jax.models.clip import ClipVisionTower
from llava_jax.models.interfaces import LanguageModel, VisionTower
from llava_jax.models.llama import LlamaModel
from llava_jax.models.projector import Projector

# vision_config.model_type -> its tower, built from the LLaVA config and the compute dtype.
VISION_TOWERS: dict[str, Callable[[LlavaConfig, jnp.dtype], VisionTower]] = {
    "clip_vision_model": lambda c, dtype: ClipVisionTower(c.vision, c.feature_layers, dtype, c.remat_policy,
                                                          c.scan_layers),
}


def _llama(c: LlavaConfig, dtype: jnp.dtype) -> LlamaModel:
  return LlamaModel(c.text, dtype, c.remat_policy, c.scan_layers, c.out_first_kernels)


# text_config.model_type -> its decoder; families that differ from LLaMA only by config flags share its module.
LANGUAGE_MODELS: dict[str, Callable[[LlavaConfig, jnp.dtype], LanguageModel]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
}


def check_image_token_count(input_ids, images_per_row: int, tokens_per_image: int, image_token_index: int) -> None:
  """Raises when a row's image-token count differs from what its images produce (host-side check)."""
  counts = np.sum(np.asarray(input_ids) == image_token_index, axis=1)
  want = images_per_row * tokens_per_image
  for row, got in enumerate(counts):
    if got != want:
      raise LlavaJaxError(
          f"row {row}: the prompt has {got} image tokens but {images_per_row} image(s) give {want} features "
          f"({tokens_per_image} per image)")


def attention_layout(kv_mask: jax.Array, num_queries: int, cache_index, sliding_window: int | None = None):
  """Positions (B, S) and the causal mask (B, S, T) for queries at slots [cache_index, cache_index + S).

  kv_mask (B, T) marks the valid key slots (False for left padding and unwritten cache slots).
  Positions count valid slots, so left-padded rows start at 0 exactly as HF's generate does.
  With a `sliding_window` W (Mistral), the query at slot i sees the keys at slots j with
  i - W < j <= i: its last W tokens, itself included, counted in slots as transformers'
  `sliding_window_overlay` counts them (slots and positions differ only by left padding).
  """
  query_slots = cache_index + jnp.arange(num_queries)
  positions = jnp.maximum(jnp.cumsum(kv_mask.astype(jnp.int32), axis=1) - 1, 0)
  positions = jnp.take(positions, query_slots, axis=1)
  distance = query_slots[:, None] - jnp.arange(kv_mask.shape[1])[None, :]
  visible = distance >= 0
  if sliding_window is not None:
    visible &= distance < sliding_window
  return positions, kv_mask[:, None, :].astype(bool) & visible[None]


def example_batch(config: LlavaConfig) -> dict:
  """A one-row batch of the model's input shapes, to initialize or trace it (contents unused)."""
  size = config.vision.image_size
  return {"input_ids": np.zeros((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32),
          "pixel_values": np.zeros((1, 1, size, size, 3), np.float32)}


def abstract_params(config: LlavaConfig):
  """Llava(config)'s parameters as boxed shapes carrying their logical axis names (no memory used)."""
  ex = example_batch(config)
  return jax.eval_shape(Llava(config).init, jax.random.key(0), ex["input_ids"], ex["pixel_values"],
                        ex["attention_mask"])["params"]


def unstack_layers(params: dict) -> dict:
  """Scanned parameters (`*/layers`, stacked) -> unrolled (`*/layers_{i}`), in both towers."""
  def unstack(tower: dict) -> dict:
    tower = dict(tower)
    stacked = tower.pop("layers")
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
      tower[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return tower
  return {**params, "vision_tower": unstack(params["vision_tower"]),
          "language_model": unstack(params["language_model"])}


def projector_for(c: LlavaConfig, dtype=jnp.float32) -> Projector:
  """The connector `Llava` builds (also initialized alone where the towers come pretrained)."""
  return Projector(c.projector_type, c.text.hidden_size, c.projector_hidden_act, c.multimodal_projector_bias, dtype)


class Llava(nn.Module):
  config: LlavaConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.vision_tower = VISION_TOWERS[c.vision.model_type](c, dtype)
    self.projector = projector_for(c, dtype)
    self.language_model = LANGUAGE_MODELS[c.text.model_type](c, dtype)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, tokens_per_image, text_hidden)."""
    hidden = self.vision_tower(pixel_values)
    if self.config.vision_feature_select_strategy == "default":
      hidden = tuple(h[:, 1:] for h in hidden)  # drop the class token
    return self.projector(jnp.concatenate(hidden, axis=-1))

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
    """Token embeddings with each row's image features written, in order, at its image tokens.

    pixel_values (B, M, H, W, C): row b's M images fill row b's image tokens; slots beyond a
    row's image tokens (padding images) are computed and ignored.
    """
    embeds = self.language_model.embed(input_ids)
    if pixel_values is None:
      return embeds
    b, m = pixel_values.shape[:2]
    features = self.encode_images(pixel_values.reshape((b * m,) + pixel_values.shape[2:]))
    features = features.reshape(b, -1, features.shape[-1]).astype(embeds.dtype)
    is_image = input_ids == self.config.image_token_index
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, embeds)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, cache=None, cache_index=0, last_logits_only: bool = False):
    """Logits (B, S, vocab) float32 (B, 1, vocab with `last_logits_only`) and the updated cache.

    attention_mask: (B, S) without a cache (1 = real token; left or right padding), or (B, T)
    over the cache slots with one (including the slots this call writes).
    """
    if pixel_values is not None and not isinstance(input_ids, jax.core.Tracer):
      c = self.config
      check_image_token_count(input_ids, pixel_values.shape[1], c.image_seq_length, c.image_token_index)
    embeds = self.embed(input_ids, pixel_values)
    if attention_mask is None:  # required with a cache
      attention_mask = jnp.ones(input_ids.shape, bool)
    positions, mask = attention_layout(attention_mask, input_ids.shape[1], cache_index, self.config.text.sliding_window)
    return self.language_model(embeds, positions, mask, cache, cache_index, last_logits_only)
