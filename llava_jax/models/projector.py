"""The vision-language connector: `linear` (LLaVA-1.0) or `mlp2x` (LLaVA-1.5's mlp2x_gelu)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.layers import activation, dense
from llava_jax.models.lora import LoraConfig


class Projector(nn.Module):
  """(…, vision_features) -> (…, text_hidden). `linear_1` [-> act -> `linear_2`], as HF names them."""
  kind: str
  out_features: int
  act: str = "gelu"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  lora: LoraConfig | None = None  # LlavaConfig.lora

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(self.out_features, (None, "embed"), name="linear_1", dtype=self.dtype, use_bias=self.use_bias,
              lora=self.lora)(x)
    if self.kind == "linear":
      return x
    x = activation(self.act)(x)
    return dense(self.out_features, ("mlp", "embed"), name="linear_2", dtype=self.dtype, use_bias=self.use_bias,
                 lora=self.lora)(x)
