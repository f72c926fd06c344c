"""CLIP ViT vision tower (the encoder half of CLIPVisionModel), returning selected hidden states.

Its embeddings, encoder blocks and layer loop are the ViT that SigLIP's tower (models/siglip.py) shares; the
two differ by flags (class token, patch-embedding bias) and by their norms around the encoder.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import VisionConfig
from llava_jax.models.attention import dot_product_attention, heads_major
from llava_jax.models.lora import LoraConfig
from llava_jax.models.layers import INIT_STD, activation, dense, logical, scan_layers


def layer_norm(config: VisionConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32,
      scale_init=logical(nn.initializers.ones, ("embed",)),
      bias_init=logical(nn.initializers.zeros, ("embed",)), name=name)


class PatchEmbeddings(nn.Module):
  """pixel_values (N, H, W, C) -> (N, class_tokens + patches, D): the class token where the config's family has
  one (CLIP; SigLIP has none), the patches (a stride-patch "valid" convolution, with a bias in SigLIP), plus a
  learned position for every token."""
  config: VisionConfig
  dtype: jnp.dtype
  patch_bias: bool = False

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    patches = nn.Conv(
        c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
        use_bias=self.patch_bias, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=logical(nn.initializers.normal(INIT_STD), (None, None, None, "embed")),
        bias_init=logical(nn.initializers.zeros, ("embed",)), name="patch_embedding")(pixel_values.astype(self.dtype))
    n = patches.shape[0]
    tokens = patches.reshape(n, -1, c.hidden_size)
    if c.class_tokens:
      cls = self.param("class_embedding", logical(nn.initializers.normal(INIT_STD), ("embed",)), (c.hidden_size,))
      tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c.hidden_size)), tokens], axis=1)
    positions = nn.Embed(
        c.num_patches + c.class_tokens, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=logical(nn.initializers.normal(INIT_STD), (None, "embed")), name="position_embedding")
    return tokens + positions.embedding.astype(self.dtype)[None]


class ClipAttention(nn.Module):
  config: VisionConfig
  dtype: jnp.dtype
  attention: str = "auto"  # LlavaConfig.attention
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    heads = (c.num_attention_heads, c.head_dim)
    q, k, v = (dense(heads, ("embed", "heads", "kv"), name=n, dtype=self.dtype, use_bias=True,
                     lora=self.lora)(x)
               for n in ("q_proj", "k_proj", "v_proj"))
    out = dot_product_attention(q, heads_major(k), heads_major(v), None, c.head_dim ** -0.5, kernel=self.attention)
    return dense(c.hidden_size, ("heads", "kv", "embed"), name="out_proj", dtype=self.dtype, use_bias=True,
                 contract=(-2, -1), lora=self.lora)(out)


class ClipMlp(nn.Module):
  config: VisionConfig
  dtype: jnp.dtype
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    x = dense(c.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype, use_bias=True, lora=self.lora)(x)
    x = activation(c.hidden_act)(x)
    return dense(c.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype, use_bias=True, lora=self.lora)(x)


class ClipEncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block. Also tracks the hidden states LLaVA selects.

  The carry holds the running hidden state and `selected`, one slot per requested hidden-state
  index; keeping only those (instead of stacking every layer's output) bounds activation memory.
  """
  config: VisionConfig
  dtype: jnp.dtype
  feature_layers: tuple[int, ...]
  attention: str = "auto"
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, carry, layer_index):
    h, selected = carry
    x = layer_norm(self.config, "layer_norm1")(h).astype(self.dtype)
    h = h + ClipAttention(self.config, self.dtype, self.attention, self.lora, name="self_attn")(x)
    x = layer_norm(self.config, "layer_norm2")(h).astype(self.dtype)
    h = h + ClipMlp(self.config, self.dtype, self.lora, name="mlp")(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    hidden_index = layer_index + 1  # hidden state 0 is the embeddings output
    selected = tuple(jnp.where(hidden_index == want, h, s) for want, s in zip(self.feature_layers, selected))
    return (h, selected), None


class VisionTransformer(nn.Module):
  """The fields and encoder loop the ViT towers share; a tower's __call__ adds its embeddings and norms."""
  config: VisionConfig
  feature_layers: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32
  remat_policy: str = "none"
  scan: bool = True  # False: unrolled `layers_{i}` (inference; see llama.py on why)
  attention: str = "auto"  # LlavaConfig.attention
  lora: LoraConfig | None = None  # LlavaConfig.lora

  def encode(self, h: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Embeddings output (N, T, D) -> the last layer's output and the hidden states at `feature_layers`."""
    c = self.config
    selected = tuple(h if want == 0 else jnp.zeros_like(h) for want in self.feature_layers)
    if self.scan:
      encoder = scan_layers(
          ClipEncoderLayer, remat_policy=self.remat_policy, length=c.num_hidden_layers, in_axes=(0,),
          name="layers", config=c, dtype=self.dtype, feature_layers=self.feature_layers, attention=self.attention,
          lora=self.lora)
      (h, selected), _ = encoder((h, selected), jnp.arange(c.num_hidden_layers))
    else:
      for i in range(c.num_hidden_layers):
        layer = ClipEncoderLayer(c, self.dtype, self.feature_layers, self.attention, self.lora, name=f"layers_{i}")
        (h, selected), _ = layer((h, selected), i)
    return h, selected


class ClipVisionTower(VisionTransformer):
  """pixel_values (N, H, W, C) -> hidden states at `feature_layers`, each (N, 1 + patches, D)."""

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, ...]:
    c = self.config
    h = PatchEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
    h = layer_norm(c, "pre_layrnorm")(h).astype(self.dtype)
    h, selected = self.encode(h)
    if self.is_initializing():
      # CLIP's pooled output is unused by LLaVA; its norm is created so checkpoints round-trip.
      layer_norm(c, "post_layernorm")(h[:, 0])
    return selected
