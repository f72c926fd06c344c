"""Building blocks shared by the vision tower and the language model.

Every parameter is created with logical axis names (see `llava_jax/sharding.py` for the rules
that map them onto the device mesh), so sharding is declared here once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.errors import LlavaJaxError

INIT_STD = 0.02


def logical(init: Callable, names: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(names))


class DenseGeneral(nn.Module):
  """y = x · kernel (+ bias), contracting x's trailing `contract` axes with the kernel's leading ones.

  Unlike flax's DenseGeneral, the kernel is created at its real shape, so its logical axis names
  (`axes`: contracted input dimensions, then output ones) hold when sharding rules are active.
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool
  dtype: jnp.dtype
  contract: int | tuple[int, ...] = -1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    contract = (self.contract,) if isinstance(self.contract, int) else tuple(self.contract)
    contract = tuple(sorted(a % x.ndim for a in contract))
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    shape = tuple(x.shape[a] for a in contract) + features
    kernel = self.param("kernel", logical(nn.initializers.normal(INIT_STD), self.axes), shape, jnp.float32)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((contract, tuple(range(len(contract)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros, self.axes[len(contract):]), features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes: Sequence[str | None], *, name: str, dtype, use_bias: bool,
          contract=-1) -> DenseGeneral:
  """A DenseGeneral whose kernel (and bias) carry logical axis names.

  `axes` names every kernel dimension: the contracted input ones, then the output ones.
  """
  return DenseGeneral(features, tuple(axes), use_bias, dtype, contract, name=name)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation functions named in HF configs, with PyTorch's exact definitions."""
  table = {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's default GELU is the erf form
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "relu": jax.nn.relu,
      "linear": lambda x: x,
  }
  if name not in table:
    raise LlavaJaxError(f"config: unsupported activation {name!r} (supported: {', '.join(sorted(table))})")
  return table[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
  """Scaled dot-product attention with grouped key/value heads; softmax in float32.

  q: (B, S, H, D); k, v: (B, K, T, D), heads before slots as the KV cache stores them (a decode
  step then reads each head's keys contiguously instead of transposing the cache); H a multiple
  of K; mask: (B, S, T) bool or None.
  """
  b, s, h, d = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(b, s, kv_heads, h // kv_heads, d)
  logits = jnp.einsum("bskgd,bktd->bkgst", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,bktd->bskgd", probs, v)
  return out.reshape(b, s, h, d)


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(layer_cls: type[nn.Module], *, remat_policy: str, length: int, in_axes: tuple,
                name: str, **layer_kwargs) -> nn.Module:
  """Stacks `length` copies of `layer_cls` on a leading `layers` axis with nn.scan.

  Compile time stays flat in depth. `remat_policy` is "none" or a key of REMAT_POLICIES.
  """
  if remat_policy != "none":
    if remat_policy not in REMAT_POLICIES:
        raise LlavaJaxError(f"config: remat_policy must be none or one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}")
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  scanned = nn.scan(
      layer_cls,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=in_axes,
      length=length,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(name=name, **layer_kwargs)
