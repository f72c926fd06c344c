"""LLaMA-family decoder: RMSNorm, rotary positions, GQA, SwiGLU, KV cache.

One module for every family that differs from LLaMA only by config flags: Vicuna and Yi (LLaMA
architecture), Mistral (sliding window), Llama-3 (rope_type llama3 scaling) and Qwen2 (q/k/v
biases without an o_proj bias); config.TEXT_FAMILIES reads each family's flags.

The KV cache is an explicit pytree passed in and returned, so decoding stays pure-functional and
runs inside `lax.while_loop`: `{"k", "v"}` of shape (layers, batch·kv_heads, slots, head_dim) with
scanned layers, or a tuple of per-layer `{"k", "v"}` (batch·kv_heads, slots, head_dim) unrolled
(batch and heads merged: see attention.xla_attention).

Layers are scanned (`layers/...`, stacked on a leading axis: compile time flat in depth) for
training, or unrolled (`layers_0/...`, `layers_1/...`) for decoding: XLA on CPU copies a layer's
slice of stacked weights before using it, which triples the memory traffic of a decode step.
`llava.unstack_layers` turns the one parameter layout into the other.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import RopeScaling, TextConfig
from llava_jax.models.attention import AttentionMask, dot_product_attention, heads_major
from llava_jax.models.lora import LoraConfig
from llava_jax.models.layers import INIT_STD, activation, dense, logical, scan_layers, weight_dot


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def _llama3_inv_freq(inv_freq: jax.Array, s: RopeScaling) -> jax.Array:
  """Llama 3.1's scaling (transformers' `_compute_llama3_parameters`): wavelengths shorter than
  original_max/high_freq_factor keep their frequency, longer than original_max/low_freq_factor are
  divided by `factor`, and the band between interpolates smoothly."""
  old_context = s.original_max_position_embeddings
  low_freq_wavelen, high_freq_wavelen = old_context / s.low_freq_factor, old_context / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


# rope_type -> the scaled inverse frequencies (config.ROPE_TYPES lists the parameters each reads).
ROPE_SCALINGS = {
    "default": lambda inv_freq, s: inv_freq,
    "linear": lambda inv_freq, s: inv_freq / s.factor,
    "llama3": _llama3_inv_freq,
}


def rotary_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
  """The (head_dim / 2,) float32 rotary frequencies, scaled as transformers' rope_type does."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return ROPE_SCALINGS[scaling.rope_type](inv_freq, scaling)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling):
  """cos/sin tables (B, S, head_dim) in float32 for HF's half-split rotary layout."""
  freqs = positions.astype(jnp.float32)[..., None] * rotary_inv_freq(head_dim, theta, scaling)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, S, H, D): rotates the two halves of each head as HF's `rotate_half` does."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
  return x * cos + rotated * sin


class LlamaAttention(nn.Module):
  config: TextConfig
  dtype: jnp.dtype
  out_first: bool = False
  attention: str = "auto"  # LlavaConfig.attention
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
    """layer_cache: this layer's {"k", "v"} (B·kv_heads, T, head_dim), or None without a cache."""
    c = self.config
    proj = lambda heads, axes, name: dense((heads, c.head_dim), ("embed", axes, "kv"), name=name, dtype=self.dtype,
                                           use_bias=c.qkv_bias, out_first=self.out_first, lora=self.lora)(x)
    q = apply_rotary(proj(c.num_attention_heads, "heads", "q_proj"), cos, sin)
    k = heads_major(apply_rotary(proj(c.num_key_value_heads, "kv_heads", "k_proj"), cos, sin))
    v = heads_major(proj(c.num_key_value_heads, "kv_heads", "v_proj"))
    # A prefill: queries at slots [0, S) see keys [0, S) only (causal mask), whatever else the cache holds.
    prefill = layer_cache is not None and isinstance(cache_index, int) and cache_index == 0
    if layer_cache is not None:
      layer_cache = {name: jax.lax.dynamic_update_slice_in_dim(layer_cache[name], new.astype(layer_cache[name].dtype),
                                                               cache_index, axis=1)
                     for name, new in (("k", k), ("v", v))}
      if not prefill:
        k, v = layer_cache["k"], layer_cache["v"]
    k, v = k.astype(self.dtype), v.astype(self.dtype)
    out = dot_product_attention(q, k, v, mask, c.head_dim ** -0.5, kernel=self.attention,
                                causal=layer_cache is None or prefill, sliding_window=c.sliding_window,
                                skip_masked_blocks=prefill)
    out = dense(c.hidden_size, ("heads", "kv", "embed"), name="o_proj", dtype=self.dtype, use_bias=c.o_proj_bias,
                contract=(-2, -1), out_first=self.out_first, lora=self.lora)(out)
    return out, layer_cache


class LlamaMlp(nn.Module):
  config: TextConfig
  dtype: jnp.dtype
  out_first: bool = False
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, x):
    c = self.config
    proj = lambda features, axes, name, x: dense(features, axes, name=name, dtype=self.dtype, use_bias=c.mlp_bias,
                                                 out_first=self.out_first, lora=self.lora)(x)
    x = activation(c.hidden_act)(proj(c.intermediate_size, ("embed", "mlp"), "gate_proj", x)) * proj(
        c.intermediate_size, ("embed", "mlp"), "up_proj", x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    return proj(c.hidden_size, ("mlp", "embed"), "down_proj", x)


class LlamaDecoderLayer(nn.Module):
  config: TextConfig
  dtype: jnp.dtype
  out_first: bool = False
  attention: str = "auto"
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, h, layer_cache, cos, sin, mask, cache_index):
    c = self.config
    x = RMSNorm(c.rms_norm_eps, self.dtype, name="input_norm")(h)
    attn, layer_cache = LlamaAttention(c, self.dtype, self.out_first, self.attention, self.lora, name="self_attn")(
        x, cos, sin, mask, layer_cache, cache_index)
    h = h + attn
    x = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_norm")(h)
    h = h + LlamaMlp(c, self.dtype, self.out_first, self.lora, name="mlp")(x)
    return nn.with_logical_constraint(h, ("batch", "length", "embed")), layer_cache


def init_cache(config: TextConfig, batch: int, slots: int, dtype=jnp.float32, scanned: bool = True):
  """An empty KV cache: stacked for scanned layers, a tuple of per-layer caches for unrolled ones."""
  layer_shape = (batch * config.num_key_value_heads, slots, config.head_dim)
  if scanned:
    shape = (config.num_hidden_layers,) + layer_shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return tuple({"k": jnp.zeros(layer_shape, dtype), "v": jnp.zeros(layer_shape, dtype)}
               for _ in range(config.num_hidden_layers))


def kernels_out_first(params: dict) -> dict:
  """Unrolled parameters -> the same with every language-model kernel stored output axes first.

  The layout of `LlamaModel(out_first=True)`; o_proj contracts two input axes (heads, head_dim).
  """
  def transpose(path, x):
    names = [getattr(p, "key", None) for p in path]
    if names[-1] != "kernel":
      return x
    n_in = 2 if "o_proj" in names else 1
    return jnp.moveaxis(x, tuple(range(n_in)), tuple(range(x.ndim - n_in, x.ndim)))
  if "layers" in params["language_model"]:
    raise ValueError("kernels_out_first expects unrolled layers (see llava.unstack_layers)")
  return {**params, "language_model": jax.tree_util.tree_map_with_path(transpose, params["language_model"])}


class LlamaModel(nn.Module):
  """Token embeddings -> scanned decoder layers -> final norm -> vocabulary logits."""
  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  remat_policy: str = "none"
  scan: bool = True
  out_first: bool = False  # dense kernels stored (out, in): the decode layout (see layers.weight_dot)
  attention: str = "auto"  # LlavaConfig.attention
  lora: LoraConfig | None = None  # LlavaConfig.lora

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=logical(nn.initializers.normal(INIT_STD), ("vocab", "embed")))
    if self.scan:
      self.layers = scan_layers(
          LlamaDecoderLayer, remat_policy=self.remat_policy, length=c.num_hidden_layers,
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), name="layers", config=c,
          dtype=self.dtype, out_first=self.out_first, attention=self.attention, lora=self.lora)
    else:
      self.layers = [LlamaDecoderLayer(c, self.dtype, self.out_first, self.attention, self.lora)
                     for _ in range(c.num_hidden_layers)]  # layers_{i}
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype)
    if not c.tie_word_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), name="lm_head", dtype=self.dtype, use_bias=False,
                           out_first=self.out_first, lora=self.lora)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.embed_tokens(input_ids)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, mask: AttentionMask,
               cache=None, cache_index: jax.Array | int = 0, last_logits_only: bool = False):
    """inputs_embeds (B, S, D); positions (B, S); mask over the T key slots (dense (B, S, T) and segment ids).

    Without a cache, T == S. With one, this call's keys/values are written at slots
    [cache_index, cache_index + S) and the queries attend over all T cache slots.
    Returns float32 logits (B, S, vocab) — (B, 1, vocab) for the last position only with
    `last_logits_only`, which spares a prefill the full-vocabulary product — and the updated
    cache (None without one).
    """
    c = self.config
    cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)
    h = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ("batch", "length", "embed"))
    if self.scan:
      h, cache = self.layers(h, cache, cos, sin, mask, cache_index)
    else:
      caches = [None] * len(self.layers) if cache is None else list(cache)
      for i, layer in enumerate(self.layers):
        h, caches[i] = layer(h, caches[i], cos, sin, mask, cache_index)
      cache = None if cache is None else tuple(caches)
    if last_logits_only:
      h = h[:, -1:]
    h = self.norm(h)
    if not c.tie_word_embeddings:
      logits = self.lm_head(h)
    elif self.out_first:  # the (vocab, embed) table is already out-first
      logits = weight_dot(self.embed_tokens.embedding.astype(self.dtype), h, (h.ndim - 1,))
    else:
      logits = self.embed_tokens.attend(h)
    return logits.astype(jnp.float32), cache
