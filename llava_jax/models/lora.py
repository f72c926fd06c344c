"""LoRA adapters (Hu et al. 2021) and QLoRA's quantized frozen base, on the linear layers whose path matches a regex.

A targeted `LogicalDense` holds, next to its frozen `kernel` (in..., out...), the adapter
    lora_a (in..., rank)   kaiming-uniform, as PEFT initializes it (bound 1/sqrt(fan_in))
    lora_b (rank, out...)  zeros, so a fresh adapter leaves the model's output exactly as it was
and computes y = x·W + (alpha / rank) · dropout(x)·A·B. Under QLoRA the kernel is stored quantized instead, as
`kernel_q` codes and `kernel_scale` group scales (models/quantize.py), dequantized on the fly into the compute
dtype. The adapters live at the kernel's path (`.../q_proj/lora_a`), stacked on the `layers` axis like it when
layers are scanned, so the inference layouts (unstack_layers, kernels_out_first) and exporters find them by path.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llava_jax.errors import LlavaJaxError
from llava_jax.models import quantize

ADAPTER_LEAVES = ("lora_a", "lora_b")
QUANTIZED_LEAVES = ("kernel_q", "kernel_scale")
_UNROLLED_LAYER = re.compile(r"/layers_\d+(?=/)")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`targets`: regex fullmatched against a linear layer's parameter path without its leaf name, in the
  checkpoint layout (scanned: `language_model/layers/self_attn/q_proj`; unrolled `layers_{i}` count as `layers`).
  `quantize`: how the targeted layers' frozen kernels are stored (quantize.MODES), in groups of `group_size`."""
  rank: int
  alpha: float
  targets: str
  dropout: float = 0.0
  quantize: str = "none"
  group_size: int = 64

  def __post_init__(self):
    if self.rank <= 0:
      raise LlavaJaxError(f"config: lora.rank must be >= 1, got {self.rank}")
    if not 0 <= self.dropout < 1:
      raise LlavaJaxError(f"config: lora.dropout must be in [0, 1), got {self.dropout}")
    if self.quantize not in quantize.MODES:
      raise LlavaJaxError(f"config: lora.quantize must be one of {quantize.MODES}, got {self.quantize!r}")
    if self.group_size < 2 or self.group_size % 2:
      raise LlavaJaxError(f"config: lora.group_size must be an even number >= 2, got {self.group_size}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise LlavaJaxError(f"config: lora.targets {self.targets!r} is not a regex: {e}") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targets_path(self, module_path: tuple[str, ...]) -> bool:
    return re.fullmatch(self.targets, _UNROLLED_LAYER.sub("/layers", "/".join(module_path) + "/")[:-1]) is not None


def lora_a_init(key, shape, dtype=jnp.float32):
  """PEFT's kaiming_uniform_(a=sqrt(5)) of lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = the inputs."""
  bound = 1 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def frozen_kernel(module: nn.Module, spec: LoraConfig, in_shape: tuple, features: tuple, in_axes: tuple,
                  out_axes: tuple, init, dtype) -> jax.Array:
  """A quantized layer's kernel (in..., out...) in `dtype`, from its `kernel_q` and `kernel_scale` parameters
  (at init, the quantized random kernel `init` draws)."""
  k, n = math.prod(in_shape), math.prod(features)
  if k % spec.group_size:
    raise LlavaJaxError(f"config: lora.group_size {spec.group_size} does not divide the {k} inputs of "
                        f"{'/'.join(module.path)}")
  # Both parameters come from one random kernel; flax also calls initializers abstractly to check shapes.
  key = module.make_rng("params") if module.is_initializing() else jax.random.key(0)
  quantized = lambda: quantize.quantize(init(key, (k, n)), spec.quantize, spec.group_size)
  axes = (in_axes[0],) + out_axes  # the flattened inputs shard like their first axis
  codes = module.param("kernel_q", nn.with_logical_partitioning(
      lambda *_: quantized()[0].reshape((-1,) + features), axes))
  scales = module.param("kernel_scale", nn.with_logical_partitioning(
      lambda *_: quantized()[1].reshape((-1,) + features), axes))
  w = quantize.dequantize(codes.reshape(-1, n), scales.reshape(-1, n), spec.quantize, spec.group_size)
  return w.reshape(in_shape + features).astype(dtype)


def adapter(module: nn.Module, spec: LoraConfig, x: jax.Array, contract: tuple[int, ...], in_shape: tuple,
            features: tuple, in_axes: tuple, out_axes: tuple, dtype) -> jax.Array:
  """(alpha / rank) · dropout(x)·A·B, with dropout only where the call has a `dropout` rng (training)."""
  a = module.param("lora_a", nn.with_logical_partitioning(lora_a_init, in_axes + (None,)),
                   in_shape + (spec.rank,), jnp.float32)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                   (spec.rank,) + features, jnp.float32)
  if spec.dropout:
    x = nn.Dropout(spec.dropout, deterministic=not module.has_rng("dropout"))(x)
  xa = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), ((contract, tuple(range(len(contract)))), ((), ())))
  y = jax.lax.dot_general(xa, b.astype(dtype), (((xa.ndim - 1,), (0,)), ((), ())))
  return y * jnp.asarray(spec.scale, dtype)


def _stacked(box) -> int:
  names = box.names if isinstance(box, nn.LogicallyPartitioned) else ()
  return sum(1 for name in names if name == "layers")


def from_base(base: dict, abstract: dict, spec: LoraConfig, key: jax.Array) -> dict:
  """Host parameters of the model without adapters (checkpoint layout, float kernels) -> the LoRA model's:
  targeted kernels quantized as `spec` says, fresh adapters (A drawn per path from `key`, B zero). Leaves the
  base already has (adapters of an earlier LoRA run) are kept. `abstract`: the LoRA model's boxed shapes."""
  flat_base, flat_abstract = traverse_util.flatten_dict(base, sep="/"), traverse_util.flatten_dict(abstract, sep="/")
  used, out = set(), {}
  for path, box in flat_abstract.items():
    shape = nn.unbox(box).shape
    module, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
    if path in flat_base:
      out[path] = flat_base[path]
      used.add(path)
    elif leaf == "lora_a":
      lead = _stacked(box)
      draw = lambda k: lora_a_init(k, shape[lead:])
      for _ in range(lead):
        draw = jax.vmap(draw)
      keys = jax.random.split(jax.random.fold_in(key, zlib.crc32(path.encode())), shape[:lead]) if lead else \
          jax.random.fold_in(key, zlib.crc32(path.encode()))
      out[path] = np.asarray(draw(keys))
    elif leaf == "lora_b":
      out[path] = np.zeros(shape, np.float32)
    elif leaf in QUANTIZED_LEAVES and f"{module}/kernel" in flat_base:
      if leaf == "kernel_q":
        kernel, lead = flat_base[f"{module}/kernel"], _stacked(box)
        n_out = len(shape) - lead - 1
        w = np.asarray(kernel, np.float32)
        w = w.reshape(w.shape[:lead] + (-1, math.prod(w.shape[w.ndim - n_out:])))
        codes, scales = quantize.quantize(jnp.asarray(w), spec.quantize, spec.group_size)
        out[path] = np.asarray(codes).reshape(shape)
        out[f"{module}/kernel_scale"] = np.asarray(scales).reshape(nn.unbox(flat_abstract[f"{module}/kernel_scale"]).shape)
        used.add(f"{module}/kernel")
    else:
      raise LlavaJaxError(f"init: the checkpoint has no parameter {path!r} of the model built from its config")
  extra = sorted(set(flat_base) - used)
  if extra:
    raise LlavaJaxError(f"init: the checkpoint's parameter {extra[0]!r} is not in the model built from its config")
  return traverse_util.unflatten_dict(out, sep="/")


def is_quantized(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in QUANTIZED_LEAVES


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES
