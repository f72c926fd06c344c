"""Weight-only quantization of frozen kernels (QLoRA's base): int8, and 4-bit NF4 packed two codes a byte.

A kernel is quantized as a (K, N) matrix (K = its flattened input dimensions, N = its output ones) in groups of
`group` consecutive inputs per output column, each group with its own float32 absmax scale (the per-block absmax
of bitsandbytes). Any leading dimensions (the stacked `layers` axis of scanned models) are carried through.
- int8: code = round(w / s) with s = absmax / 127; |w - dequantized| <= s / 2.
- nf4: code = the nearest of the 16 NormalFloat levels (QLoRA, Dettmers et al. 2023) to w / absmax; the error is at
  most absmax x half the widest gap between neighbouring levels (`max_error`). Two codes share a byte: the even
  input row in the low nibble, the odd one in the high nibble.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "int8", "nf4")

# bitsandbytes' NF4 levels (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
INT8_MAX = 127


def code_rows(k: int, mode: str) -> int:
  """Rows of the stored codes for K inputs (two 4-bit codes a byte for nf4)."""
  return k // 2 if mode == "nf4" else k


def code_dtype(mode: str):
  return jnp.uint8 if mode == "nf4" else jnp.int8


def _grouped(x: jax.Array, group: int) -> jax.Array:
  """(*lead, K, N) -> (*lead, K/group, group, N)."""
  return x.reshape(x.shape[:-2] + (x.shape[-2] // group, group, x.shape[-1]))


def quantize(w: jax.Array, mode: str, group: int) -> tuple[jax.Array, jax.Array]:
  """(*lead, K, N) float -> (codes (*lead, code_rows(K), N), scales (*lead, K/group, N) float32)."""
  g = _grouped(w.astype(jnp.float32), group)
  absmax = jnp.max(jnp.abs(g), axis=-2, keepdims=True)
  if mode == "int8":
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
    codes = jnp.clip(jnp.round(g / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8).reshape(w.shape)
    return codes, scale[..., 0, :]
  scale = jnp.where(absmax > 0, absmax, 1.0)
  midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
  codes = jnp.searchsorted(midpoints, g / scale).astype(jnp.uint8).reshape(w.shape)
  return codes[..., 0::2, :] | (codes[..., 1::2, :] << 4), scale[..., 0, :]


def dequantize(codes: jax.Array, scales: jax.Array, mode: str, group: int) -> jax.Array:
  """The inverse of `quantize` up to its rounding: (*lead, K, N) float32."""
  if mode == "int8":
    values = codes.astype(jnp.float32)
  else:
    nibbles = jnp.stack([codes & 15, codes >> 4], axis=-2)  # (*lead, K/2, 2, N)
    values = jnp.asarray(NF4_LEVELS)[nibbles.reshape(codes.shape[:-2] + (2 * codes.shape[-2], codes.shape[-1]))]
  g = _grouped(values, group) * scales[..., None, :]
  return g.reshape(values.shape)

