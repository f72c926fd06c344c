"""Building blocks shared by the vision tower and the language model.

Every parameter is created with logical axis names (see `llava_jax/sharding.py` for the rules
that map them onto the device mesh), so sharding is declared here once.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.errors import LlavaJaxError
from llava_jax.models import lora as lora_lib

INIT_STD = 0.02


def logical(init: Callable, names: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(names))


class LogicalDense(nn.Module):
  """y = x · kernel (+ bias), contracting x's trailing `contract` axes with the kernel's input axes.

  Like flax's DenseGeneral, but the kernel is created at its real shape, so its logical axis names
  (`axes`: contracted input dimensions, then output ones) hold when sharding rules are active.
  With `out_first`, the kernel is stored output axes first (the transpose of the checkpoint
  layout) and applied by `weight_dot` — the fast layout for decoding (see there).
  With `lora` targeting this layer's path, it adds a LoRA adapter, and under QLoRA stores its kernel quantized
  (models/lora.py; a quantized kernel is dequantized input axes first whatever `out_first` says).
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool
  dtype: jnp.dtype
  contract: int | tuple[int, ...] = -1
  out_first: bool = False
  lora: lora_lib.LoraConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    contract = (self.contract,) if isinstance(self.contract, int) else tuple(self.contract)
    contract = tuple(sorted(a % x.ndim for a in contract))
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = tuple(x.shape[a] for a in contract)
    in_axes, out_axes = self.axes[:len(contract)], self.axes[len(contract):]
    init = nn.initializers.normal(INIT_STD)
    spec = self.lora if self.lora is not None and self.lora.targets_path(self.path) else None
    if spec is not None and spec.quantize != "none":
      kernel = lora_lib.frozen_kernel(self, spec, in_shape, features, in_axes, out_axes, init, self.dtype)
    elif self.out_first:
      kernel = None
      weight = self.param("kernel", logical(init, out_axes + in_axes), features + in_shape, jnp.float32)
      y = weight_dot(weight.astype(self.dtype), x.astype(self.dtype), contract)
    else:
      kernel = self.param("kernel", logical(init, in_axes + out_axes), in_shape + features, jnp.float32)
      kernel = kernel.astype(self.dtype)
    if kernel is not None:
      y = jax.lax.dot_general(x.astype(self.dtype), kernel, ((contract, tuple(range(len(contract)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros, out_axes), features, jnp.float32)
      y = y + bias.astype(self.dtype)
    if spec is not None:
      y = y + lora_lib.adapter(self, spec, x, contract, in_shape, features, in_axes, out_axes, self.dtype)
    return y


FEW_ROWS = 64  # up to this many rows of x (decode batches), weight_dot computes weight · xᵀ


def weight_dot(weight: jax.Array, x: jax.Array, contract: tuple[int, ...]) -> jax.Array:
  """x's `contract` axes (sorted, trailing) times weight (*out, *in) -> (*x_rest, *out).

  For a few rows of x (decoding), XLA:CPU multiplies a row-major weight by xᵀ at close to
  memory bandwidth, while x · weight is up to ~4x slower at 8 rows and ~15x slower for
  x · weightᵀ (jitted float32 products with an 8192² weight on the 2-core demo machine). The
  optimization barrier keeps XLA from folding the cheap output transpose back into the product
  (without it, (weight · xᵀ)ᵀ measured as slow as x · weightᵀ at 8 rows).

  For many rows (a prefill), that (*out, rows) result has to be transposed element by element
  for what follows (rotary, attention heads), which cost more than the product saved; there a
  plain 2-D x · weightᵀ is used (the text prefill of benchmarks/generate.py ran ~12% faster).
  """
  n_out = weight.ndim - len(contract)
  rows = x.shape[:x.ndim - len(contract)]
  if math.prod(rows) > FEW_ROWS:
    out = weight.shape[:n_out]
    y = jax.lax.dot_general(x.reshape(math.prod(rows), -1), weight.reshape(math.prod(out), -1),
                            (((1,), (1,)), ((), ())))
    return y.reshape(rows + out)
  y = jax.lax.dot_general(weight, x, ((tuple(range(n_out, weight.ndim)), contract), ((), ())))
  y = jax.lax.optimization_barrier(y)  # (*out, *x_rest)
  return jnp.moveaxis(y, tuple(range(n_out)), tuple(range(y.ndim - n_out, y.ndim)))


def dense(features, axes: Sequence[str | None], *, name: str, dtype, use_bias: bool,
          contract=-1, out_first: bool = False, lora: lora_lib.LoraConfig | None = None) -> LogicalDense:
  """A LogicalDense: its kernel (and bias) carry logical axis names.

  `axes` names every kernel dimension: the contracted input ones, then the output ones. `lora`: the model's
  adapter spec (the layer takes an adapter when the spec targets its path).
  """
  return LogicalDense(features, tuple(axes), use_bias, dtype, contract, out_first, lora, name=name)


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
