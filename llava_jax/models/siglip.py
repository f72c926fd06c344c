"""SigLIP vision tower (transformers' SiglipVisionModel), returning selected hidden states.

The ViT of models/clip.py without a class token or pre-layernorm; the patch embedding has a bias. LLaVA reads
hidden states, which come before `post_layernorm`; the post-layernorm output and the attention-pooling head's
are computed only at init (so checkpoints round-trip) or when the caller makes "intermediates" mutable, where
they are sown as `last_hidden_state` and `pooler_output`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import VisionConfig
from llava_jax.models.clip import ClipMlp, PatchEmbeddings, VisionTransformer, layer_norm
from llava_jax.models.attention import dot_product_attention, heads_major
from llava_jax.models.layers import INIT_STD, dense, logical
from llava_jax.models.lora import LoraConfig


class SiglipPoolingHead(nn.Module):
  """SiglipMultiheadAttentionPoolingHead: a learned probe attends over the tokens (torch's nn.MultiheadAttention,
  whose one `in_proj` holds the q, k and v projections), then a pre-LayerNorm residual MLP; (N, T, D) -> (N, D)."""
  config: VisionConfig
  dtype: jnp.dtype
  attention: str = "auto"  # LlavaConfig.attention
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    c = self.config
    probe = self.param("probe", logical(nn.initializers.normal(INIT_STD), (None, None, "embed")),
                       (1, 1, c.hidden_size))
    probe = jnp.broadcast_to(probe.astype(self.dtype), (h.shape[0], 1, c.hidden_size))
    in_proj = dense((3, c.num_attention_heads, c.head_dim), ("embed", None, "heads", "kv"), name="in_proj",
                    dtype=self.dtype, use_bias=True, lora=self.lora)
    q, kv = in_proj(probe)[:, :, 0], in_proj(h)
    out = dot_product_attention(q, heads_major(kv[:, :, 1]), heads_major(kv[:, :, 2]), None, c.head_dim ** -0.5,
                                kernel=self.attention)
    x = dense(c.hidden_size, ("heads", "kv", "embed"), name="out_proj", dtype=self.dtype, use_bias=True,
              contract=(-2, -1), lora=self.lora)(out)
    x = x + ClipMlp(c, self.dtype, self.lora, name="mlp")(layer_norm(c, "layernorm")(x).astype(self.dtype))
    return x[:, 0]


class SiglipVisionTower(VisionTransformer):
  """pixel_values (N, H, W, C) -> hidden states at `feature_layers`, each (N, patches, D)."""

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, ...]:
    c = self.config
    h = PatchEmbeddings(c, self.dtype, patch_bias=True, name="embeddings")(pixel_values)
    h, selected = self.encode(h)
    if self.is_initializing() or self.is_mutable_collection("intermediates"):
      last = layer_norm(c, "post_layernorm")(h).astype(self.dtype)
      self.sow("intermediates", "last_hidden_state", last)
      if c.vision_use_head:
        self.sow("intermediates", "pooler_output", SiglipPoolingHead(c, self.dtype, self.attention, self.lora, name="head")(last))
    return selected
