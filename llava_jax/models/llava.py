"""LLaVA: vision tower -> selected features -> projector -> image-token embeddings -> language model."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.errors import LlavaJaxError
from llava_jax.image_tokens import FeatureMix, check_image_tokens
from llava_jax.models.attention import AttentionMask
from llava_jax.models.clip import ClipVisionTower, VisionTransformer
from llava_jax.models.interfaces import LanguageModel, VisionTower
from llava_jax.models.layers import logical
from llava_jax.models.llama import LlamaModel
from llava_jax.models.projector import Projector
from llava_jax.models.siglip import SiglipVisionTower


def _vit(tower: type[VisionTransformer]) -> Callable[[LlavaConfig, jnp.dtype], VisionTower]:
  return lambda c, dtype: tower(c.vision, c.feature_layers, dtype, c.remat_policy, c.scan_layers, c.attention, c.lora)


# vision_config.model_type -> its tower, built from the LLaVA config and the compute dtype.
VISION_TOWERS: dict[str, Callable[[LlavaConfig, jnp.dtype], VisionTower]] = {
    "clip_vision_model": _vit(ClipVisionTower),
    "siglip_vision_model": _vit(SiglipVisionTower),
}


def _llama(c: LlavaConfig, dtype: jnp.dtype) -> LlamaModel:
  return LlamaModel(c.text, dtype, c.remat_policy, c.scan_layers, c.out_first_kernels, c.attention, c.lora)


# text_config.model_type -> its decoder; families that differ from LLaMA only by config flags share its module.
LANGUAGE_MODELS: dict[str, Callable[[LlavaConfig, jnp.dtype], LanguageModel]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
}


def check_image_token_count(input_ids, pixel_values, image_feature_index, config: LlavaConfig) -> None:
  """Raises when a row's image tokens are not the features its tower inputs give in the fixed layout's order
  (host-side check of a call without a feature index; whoever builds an index checks its rows, data/layouts.py)."""
  if image_feature_index is not None:
    return
  tiles = pixel_values.shape[1]
  for row, ids in enumerate(np.asarray(input_ids)):
    check_image_tokens(ids, config.media_token_ids, tiles * config.tokens_per_tile, f"row {row}",
                       f"{tiles} image tile(s)")


def _gather_features(features: jax.Array, index: jax.Array, weights: jax.Array | None) -> jax.Array:
  """features (B, F, D) at index (B, S): (B, S, D); with weights, index and weights (B, S, taps): the weighted
  sum over the taps (tap by tap, so no (B, S, taps, D) array is built)."""
  if weights is None:
    return jnp.take_along_axis(features, index[..., None], axis=1)
  total = None
  for tap in range(index.shape[-1]):
    term = jnp.take_along_axis(features, index[..., tap, None], axis=1) * weights[..., tap, None].astype(features.dtype)
    total = term if total is None else total + term
  return total


def as_grid(hidden: jax.Array) -> jax.Array:
  """(N, side * side, D) features of square patch grids -> (N, side, side, D)."""
  n, tokens, dim = hidden.shape
  side = int(round(np.sqrt(tokens)))
  return hidden.reshape(n, side, side, dim)


def spatial_pool(hidden: jax.Array, mode: str, stride: int) -> jax.Array:
  """(N, side * side, D) features of square patch grids -> (N, (side // stride) ** 2, D): torch's AvgPool2d or
  MaxPool2d of kernel and stride `stride` (rows and columns past the last whole window dropped)."""
  grid = as_grid(hidden)
  n, side, _, dim = grid.shape
  out = side // stride
  windows = grid[:, :out * stride, :out * stride].reshape(n, out, stride, out, stride, dim)
  pooled = windows.mean(axis=(2, 4)) if mode == "average" else windows.max(axis=(2, 4))
  return pooled.reshape(n, out * out, dim)


def attention_layout(segment_ids: jax.Array, num_queries: int, cache_index, sliding_window: int | None = None):
  """Positions (B, S) and the causal mask (B, S, T) for queries at slots [cache_index, cache_index + S).

  segment_ids (B, T) over the key slots: 0 for padding and unwritten cache slots, and k > 0 for
  the tokens of the row's k-th sample (a 0/1 or boolean attention mask is one sample per row; a
  packed training row holds several, each a contiguous run of slots). A query sees the earlier
  keys of its own sample only, and positions restart at 0 with each sample, so left-padded rows
  start at 0 exactly as HF's generate does. Padding queries see no key.
  With a `sliding_window` W (Mistral), the query at slot i sees the keys at slots j with
  i - W < j <= i: its last W tokens, itself included, counted in slots as transformers'
  `sliding_window_overlay` counts them (slots and positions differ only by left padding).
  """
  segment_ids = segment_ids.astype(jnp.int32)
  slots = jnp.arange(segment_ids.shape[1])
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  first_slot = jax.lax.cummax(jnp.where(starts, slots[None], 0), axis=1)  # where each slot's run began
  query_slots = cache_index + jnp.arange(num_queries)
  query_segments = jnp.take(segment_ids, query_slots, axis=1)
  positions = jnp.where(query_segments > 0, query_slots[None] - jnp.take(first_slot, query_slots, axis=1), 0)
  distance = query_slots[:, None] - slots[None, :]
  visible = distance >= 0
  if sliding_window is not None:
    visible &= distance < sliding_window
  same_sample = (query_segments[:, :, None] == segment_ids[:, None, :]) & (query_segments[:, :, None] > 0)
  return positions, same_sample & visible[None]


def example_batch(config: LlavaConfig) -> dict:
  """A one-row batch of the model's input shapes, to initialize or trace it (contents unused)."""
  size = config.vision.image_size
  return {"input_ids": np.zeros((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32),
          "pixel_values": np.zeros((1, 1, size, size, 3), np.float32),
          "image_feature_index": np.zeros((1, 8), np.int32)}


def abstract_params(config: LlavaConfig):
  """Llava(config)'s parameters as boxed shapes carrying their logical axis names (no memory used)."""
  ex = example_batch(config)
  return jax.eval_shape(Llava(config).init, jax.random.key(0), ex["input_ids"], ex["pixel_values"],
                        ex["attention_mask"], image_feature_index=ex["image_feature_index"])["params"]


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
  return Projector(c.projector_type, c.text.hidden_size, c.projector_hidden_act, c.multimodal_projector_bias, dtype, c.lora)


class Llava(nn.Module):
  config: LlavaConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.vision_tower = VISION_TOWERS[c.vision.model_type](c, dtype)
    self.projector = projector_for(c, dtype)
    self.language_model = LANGUAGE_MODELS[c.text.model_type](c, dtype)
    if c.has_image_newline:
      scale = 1 / np.sqrt(c.text.hidden_size)  # transformers' init: randn * 1/sqrt(hidden)
      self.image_newline = self.param("image_newline", logical(nn.initializers.normal(scale), ("embed",)),
                                      (c.text.hidden_size,), jnp.float32)
    if c.spatial_pool_mode == "conv":  # NeXT-Video's learned pooling: a stride x stride convolution, stride apart
      stride = (c.spatial_pool_stride,) * 2
      self.vision_resampler = nn.Conv(
          c.vision.hidden_size, stride, strides=stride, padding="VALID", dtype=dtype, param_dtype=jnp.float32,
          kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
          bias_init=logical(nn.initializers.zeros, ("embed",)))

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, tokens_per_tile, text_hidden). A model pooling video frames before the projector
    (llava_next_video) does not know which inputs are frames, so it pools every one: (N, 2 * tokens_per_tile,
    text_hidden), each input's features then its pooled ones, padded to tokens_per_tile (image_tokens.POOLED_BASE
    says how an index takes them)."""
    c = self.config
    hidden = self.vision_tower(pixel_values)
    if c.vision_feature_select_strategy == "default":
      hidden = tuple(h[:, 1:] for h in hidden)  # drop the first token (see LlavaConfig.tokens_per_tile)
    hidden = jnp.concatenate(hidden, axis=-1)
    if c.spatial_pool_mode is None:
      return self.projector(hidden)
    n, tokens, dim = hidden.shape
    if c.spatial_pool_mode == "conv":
      pooled = self.vision_resampler(as_grid(hidden)).reshape(n, -1, dim)
    else:
      pooled = spatial_pool(hidden, c.spatial_pool_mode, c.spatial_pool_stride)
    projected = self.projector(jnp.concatenate([hidden, pooled], axis=1))
    return jnp.pad(projected, ((0, 0), (0, 2 * tokens - projected.shape[1]), (0, 0)))

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
            image_feature_index: jax.Array | None = None) -> jax.Array:
    """Token embeddings with each row's image features written at its image tokens.

    pixel_values (B, M, H, W, C): row b's M tower inputs (images, AnyRes tiles, video frames), whose features,
    flattened (M * tokens_per_tile), the row's image tokens take. image_feature_index (B, K) int32:
    the row's k-th image token takes feature image_feature_index[b, k], or the image_newline embedding
    where it is -1, or the tower-pooled feature -2 - i (image_tokens.POOLED_BASE; data/layouts.py and
    data/video.py build it); a FeatureMix ((B, K, MIX_TAPS) index and weights): the
    weighted sum of those features (OneVision's downscaled grids); None: the k-th takes feature k (the fixed
    layout's order). Tower inputs no image token takes (padding tiles) are computed and ignored.
    """
    embeds = self.language_model.embed(input_ids)
    if pixel_values is None:
      return embeds
    b, m = pixel_values.shape[:2]
    features = self.encode_images(pixel_values.reshape((b * m,) + pixel_values.shape[2:]))
    pooled = None
    if self.config.spatial_pool_mode is not None:
      features, pooled = jnp.split(features, 2, axis=1)
      pooled = pooled.reshape(b, -1, pooled.shape[-1]).astype(embeds.dtype)
    features = features.reshape(b, -1, features.shape[-1]).astype(embeds.dtype)
    num_features = features.shape[1]
    is_image = jnp.isin(input_ids, jnp.asarray(self.config.media_token_ids))
    index = jnp.cumsum(is_image, axis=1) - 1  # which image token of its row each one is
    weights = None
    if image_feature_index is not None:
      mix = image_feature_index if isinstance(image_feature_index, FeatureMix) else None
      table = image_feature_index if mix is None else mix.index
      at = jnp.clip(index, 0, table.shape[1] - 1)
      take_row = lambda x: jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)
      index = take_row(table)
      weights = None if mix is None else take_row(mix.weights)
    if self.config.has_image_newline:  # the newline embedding, then any pooled features, go after the features
      newline = jnp.broadcast_to(self.image_newline.astype(embeds.dtype), (b, 1, features.shape[-1]))
      features = jnp.concatenate([features, newline] + ([] if pooled is None else [pooled]), axis=1)
      index = jnp.where(index < 0, num_features - 1 - index, index)  # -1: the newline, -2 - i: pooled feature i
    index = jnp.clip(index, 0, features.shape[1] - 1)
    gathered = _gather_features(features, index, weights)
    return jnp.where(is_image[..., None], gathered, embeds)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, cache=None, cache_index=0, last_logits_only: bool = False,
               image_feature_index: jax.Array | None = None):
    """Logits (B, S, vocab) float32 (B, 1, vocab with `last_logits_only`) and the updated cache.

    attention_mask: (B, S) without a cache (1 = real token; left or right padding; or the segment
    ids of a packed row, see `attention_layout`), or (B, T) over the cache slots with one
    (including the slots this call writes). pixel_values and
    image_feature_index: see `embed`.
    """
    if pixel_values is not None and not isinstance(input_ids, jax.core.Tracer):
      check_image_token_count(input_ids, pixel_values, image_feature_index, self.config)
    embeds = self.embed(input_ids, pixel_values, image_feature_index)
    if attention_mask is None:  # required with a cache
      attention_mask = jnp.ones(input_ids.shape, bool)
    positions, mask = attention_layout(attention_mask, input_ids.shape[1], cache_index, self.config.text.sliding_window)
    mask = AttentionMask(mask, attention_mask.astype(jnp.int32))
    return self.language_model(embeds, positions, mask, cache, cache_index, last_logits_only)
