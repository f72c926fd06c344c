"""Scaled dot-product attention for every model, with a choice of kernels (LlavaConfig.attention).

`dot_product_attention` is the one entry point; `select_kernel` picks what runs (the table is in its
docstring): the XLA einsum (`xla_attention`, any backend, the only one for a decode step), cuDNN's flash
attention through `jax.nn.dot_product_attention` (GPU) or the Pallas splash-attention kernel (TPU).
Keys and values come heads-major (see `heads_major`), the KV cache's layout, and every kernel gets
grouped KV heads as they are (no repeat).

Causal self-attention (training, a prefill) is described to the flash kernels by segment ids: a query
sees the earlier keys (within `sliding_window` slots) of its own segment. Padding is a segment of its
own (id 0) there, so every query sees at least itself and no softmax is empty; the XLA path reads the
dense mask, where padding queries see nothing. Either way a padding query's output is never read: no
real query sees a padding key.

On a mesh (traced under `sharding.active`) a flash kernel runs inside `shard_map`, one call per
device on its rows and heads as the logical-axis rules place them (`mesh_split`): neither the Pallas
call nor cuDNN's custom call may be left to XLA's partitioner (splash has no partitioning rule, and
cuDNN's needs query, key and value split alike, which grouped KV heads need not be).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from llava_jax import sharding

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128
SPLASH_BLOCK = 128  # splash's default block sizes: query and key lengths must be multiples of it
MAX_QUERY_BLOCKS = 8  # the XLA prefill's block-skipping loop: at most this many blocks, so its program is bounded
MIN_QUERY_BLOCK = 128


class AttentionMask(NamedTuple):
  """Which keys each query sees, in the two forms the kernels read.

  dense: (B, S, T) bool over the key slots (models/llava.attention_layout), read by the XLA kernel.
  segment_ids: (B, T) int over the key slots (0 = padding, k > 0 = the row's k-th sample), or None
  where the caller has none (then only the XLA kernel applies).
  """
  dense: jax.Array
  segment_ids: jax.Array | None = None


_emulated = False


@contextlib.contextmanager
def emulated_kernels():
  """Tests: runs the GPU and TPU kernels' code on any backend and dtype (cuDNN's arguments through
  jax.nn's XLA implementation, splash in Pallas interpret mode), so their plumbing is checked on a CPU."""
  global _emulated
  _emulated, before = True, _emulated
  try:
    yield
  finally:
    _emulated = before


def heads_major(x: jax.Array) -> jax.Array:
  """(B, S, K, D) keys or values -> (B·K, S, D): the layout `dot_product_attention` and the KV cache use."""
  b, s, k, d = x.shape
  return x.swapaxes(1, 2).reshape(b * k, s, d)


class MeshSplit(NamedTuple):
  """How one flash-kernel call is split over the active mesh: the partition specs of q and the output
  (B, S, H, D), of keys and values (B, K, T, D) and of the segment ids (B, T)."""
  q: P
  kv: P
  segments: P


def mesh_split(batch: int, heads: int, kv_heads: int) -> MeshSplit | str | None:
  """The split of a flash-kernel call over the mesh being traced under: rows as the logical-axis rules
  place "batch", query and KV heads as they place "heads" and "kv_heads" (so a device's query heads
  are exactly those of its KV heads' groups). None without a mesh; a sentence saying why where the call
  cannot be split so (then it runs on xla, which XLA partitions itself).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  # Separate calls: within one array, flax's rules never use a mesh axis twice (heads and kv_heads).
  q = nn.logical_to_mesh_axes(("batch", None, "heads", None))
  kv = nn.logical_to_mesh_axes(("batch", "kv_heads", None, None))
  if q[2] != kv[1]:
    return f"query heads are split over {q[2]} but KV heads over {kv[1]}"
  for what, size, axes in (("batch", batch, q[0]), ("query heads", heads, q[2]), ("KV heads", kv_heads, kv[1])):
    if size % sharding.axes_size(mesh, axes):
      return f"{what} {size} do not divide mesh axes {axes} of size {sharding.axes_size(mesh, axes)}"
  return MeshSplit(q, kv, P(q[0], None))


def select_kernel(requested: str, *, backend: str, dtype, head_dim: int, queries: int, keys: int,
                  mask: str, unsplittable: str | None = None) -> str:
  """The kernel one attention call runs: `requested` where it applies, else xla.

  mask: "none" (every query sees every key), "segments" (causal self-attention with segment ids) or
  "dense" (any other mask, e.g. a decode step's queries over a KV cache: xla only). unsplittable:
  why the active mesh cannot split the call (`mesh_split`), if it cannot: then xla.

  | kernel | applies on | dtype           | shape                                                 |
  |--------|------------|-----------------|-------------------------------------------------------|
  | xla    | any        | any             | any                                                   |
  | cudnn  | GPU        | bfloat16/float16 | head_dim a multiple of 8, <= 128; masked: even length |
  | splash | TPU        | any             | query and key lengths multiples of 128                |

  `auto` is cudnn on a GPU, splash on a TPU and xla elsewhere, each falling back to xla where it
  does not apply. Under `emulated_kernels` the backend and dtype columns are not checked. On a mesh,
  cudnn and splash also need the rows and (KV) heads to divide the mesh axes they are split over.
  """
  if requested == "auto":
    requested = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
  if requested == "xla" or mask == "dense":
    return "xla"
  if requested == "cudnn":
    platform = _emulated or (backend == "gpu" and jnp.dtype(dtype) in CUDNN_DTYPES)
    fits = head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM and not (mask == "segments" and queries % 2)
  elif requested == "splash":
    platform = _emulated or backend == "tpu"
    fits = queries % SPLASH_BLOCK == 0 and keys % SPLASH_BLOCK == 0
  else:
    raise ValueError(f"unknown attention kernel {requested!r}")
  if not (platform and fits):
    return "xla"
  if unsplittable is not None:  # the kernel would run but for the mesh: say why once (warnings deduplicates)
    warnings.warn(f"attention: {requested} runs as xla on this mesh: {unsplittable}", stacklevel=3)
    return "xla"
  return requested


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float, *,
                          kernel: str = "auto", causal: bool = False, sliding_window: int | None = None,
                          skip_masked_blocks: bool = False) -> jax.Array:
  """softmax(q·kᵀ·scale, masked) · v with grouped key/value heads; softmax in float32 (xla, splash, cudnn).

  q: (B, S, H, D); k, v: (B·K, T, D) heads-major, H a multiple of K; returns (B, S, H, D).
  mask None: every query sees every key (vision towers). `causal`: S queries at slots 0..S-1 over the
  keys at slots 0..S-1 (T >= S; later slots are ignored) under `mask` (a segment's earlier keys,
  within `sliding_window`). Otherwise `mask.dense` (B, S, T) as given (a decode step). `kernel`:
  LlavaConfig.attention, resolved per call by `select_kernel`. `skip_masked_blocks` (xla, causal):
  the prefill's block-skipping loop (`causal_xla_attention`) instead of one product.
  """
  b, s, h, d = q.shape
  if causal:
    k, v = k[:, :s], v[:, :s]
    mask = AttentionMask(mask.dense[:, :, :s], None if mask.segment_ids is None else mask.segment_ids[:, :s])
  kind = "none" if mask is None else "segments" if causal and mask.segment_ids is not None else "dense"
  kv_heads = k.shape[0] // b
  split = mesh_split(b, h, kv_heads)
  chosen = select_kernel(kernel, backend=jax.default_backend(), dtype=q.dtype, head_dim=d, queries=s,
                         keys=k.shape[1], mask=kind, unsplittable=split if isinstance(split, str) else None)
  if chosen == "xla":
    dense = None if mask is None else mask.dense
    if causal and skip_masked_blocks:
      return causal_xla_attention(q, k, v, dense, scale, sliding_window)
    return xla_attention(q, k, v, dense, scale)
  k, v = (x.reshape(b, kv_heads, k.shape[1], d) for x in (k, v))
  args = (q, k, v) if mask is None else (q, k, v, mask.segment_ids.astype(jnp.int32))
  window = sliding_window if causal else None

  def flash(q, k, v, *segments):  # looked up per call, so that tests can count the kernels' calls
    run = cudnn_attention if chosen == "cudnn" else splash_attention
    return run(q, k, v, *(segments or (None,)), scale, causal, window)
  if split is not None:  # splash's pallas_call states no varying mesh axes for its outputs: no vma check
    flash = jax.shard_map(flash, in_specs=(split.q, split.kv, split.kv, split.segments)[:len(args)],
                          out_specs=split.q, check_vma=False)
  return flash(*args)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
  """The einsum kernel: q (B, S, H, D); k, v (B·K, T, D) heads-major; mask (B, S, T) bool or None.

  Keys and values come batch and heads merged, as the KV cache stores them, so a decode step reads
  each head's keys contiguously and consumes the cache in exactly its stored shape: with a separate
  size-1 batch axis, XLA:CPU fused the cache update into two consumers and copied the whole cache four
  times per layer and step.
  """
  b, s, h, d = q.shape
  n, t = k.shape[:2]
  kv_heads = n // b
  groups = h // kv_heads
  q = q.reshape(b, s, kv_heads, groups, d).transpose(0, 2, 3, 1, 4).reshape(n, groups * s, d)
  logits = jnp.einsum("nqd,ntd->nqt", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = logits.reshape(b, kv_heads, groups, s, t)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min).reshape(n, groups * s, t)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("nqt,ntd->nqd", probs, v).reshape(b, kv_heads, groups, s, d)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def query_block(queries: int) -> int:
  """The XLA prefill's query block: 128, or larger so that a prompt has at most MAX_QUERY_BLOCKS."""
  per_block = -(-queries // MAX_QUERY_BLOCKS)
  return max(MIN_QUERY_BLOCK, -(-per_block // MIN_QUERY_BLOCK) * MIN_QUERY_BLOCK)


def causal_xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                         sliding_window: int | None = None) -> jax.Array:
  """`xla_attention` for S queries at slots 0..S-1 over their own S keys under a causal `mask`.

  Each block of queries (`query_block`) attends only to the keys up to its last slot (the mask hides
  the later ones, whose softmax weights are exactly zero), which skips ~40% of the products of a long
  prompt. The blocks are unrolled, so their number is bounded: compile time stays flat in the prompt
  length. With a `sliding_window` W (which `mask` applies), a block also skips the keys more than W - 1
  slots before its first query.
  """
  s = q.shape[1]
  block = query_block(s)
  outs = []
  for i in range(0, s, block):
    first = 0 if sliding_window is None else max(0, i - sliding_window + 1)
    keys = slice(first, i + block)
    outs.append(xla_attention(q[:, i:i + block], k[:, keys], v[:, keys], mask[:, i:i + block, keys], scale))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def cudnn_attention(q, k, v, segment_ids, scale: float, causal: bool, sliding_window: int | None) -> jax.Array:
  """jax.nn.dot_product_attention's cuDNN flash attention; k, v (B, K, T, D).

  cuDNN skips the blocks above the diagonal (is_causal) and applies the window itself; segments
  (packing, left or right padding) reach it only as a dense mask, which it adds as a bias.
  """
  mask = None
  if causal:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask, scale=scale, is_causal=causal,
      local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
      implementation="xla" if _emulated else "cudnn")


def splash_attention(q, k, v, segment_ids, scale: float, causal: bool, sliding_window: int | None) -> jax.Array:
  """The Pallas TPU splash-attention kernel, row by row; k, v (B, K, T, D) (its MHA form takes grouped heads)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  heads, s, t = q.shape[2], q.shape[1], k.shape[2]
  kernel = _splash_kernel(heads, s, t, causal, sliding_window)
  if segment_ids is None:
    row = lambda q, k, v: kernel(q, k, v)
    args = ()
  else:
    row = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids))
    args = (segment_ids,)
  out = jax.vmap(row)((q * scale).astype(q.dtype).swapaxes(1, 2), k, v, *args)
  return out.swapaxes(1, 2)


def _splash_kernel(heads: int, queries: int, keys: int, causal: bool, sliding_window: int | None):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  shape = (queries, keys)
  if sliding_window is not None:
    one = splash.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
  elif causal:
    one = splash.CausalMask(shape)
  else:
    one = splash.FullMask(shape)
  size = SPLASH_BLOCK
  blocks = splash.BlockSizes(size, size, size, size, size, size, size, size)
  return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=_emulated)
