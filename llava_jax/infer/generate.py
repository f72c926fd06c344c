"""The generation engine: prefill + decode over a preallocated KV cache, compiled per bucket.

Shapes are static so a handful of programs serve every request: prompts are LEFT padded to a
length bucket P, the cache has a bucketed number of slots T >= P + max_new_tokens, and the
batch is padded to a power of two. All rows share the cache index (slot P + step - 1 holds the
token fed at decode step `step`); left padding is handled by the attention mask, from which the
model derives per-row positions. The number of new tokens is a runtime value, so it never
causes a recompile.

Two ways to run:
- `generate`: prefill and the whole `lax.while_loop` decode in ONE compiled program.
- `stream`: the same prefill program, then a decode program that runs up to `chunk` steps per
  call, carrying the (donated, updated in place) state on device; tokens reach the host
  between chunks while the next chunk is already running.
Both draw step t's sample with fold_in(seed, t), so they produce identical tokens.

How the programs lay out their work (row-by-row or batched prefill, unrolled or scanned layers,
output-first kernels) is the engine's `InferenceLayout`, by default the backend's (infer/backend.py).
With unrolled layers, both towers run layer by layer over UNSTACKED per-layer weights (and the
language model over per-layer caches): with the scanned, stacked layout, XLA on CPU copies each
layer's weight slice (and cache slice) before every matmul, which triples the memory traffic of a
batch-1 decode step; unstacked buffers are read in place (the vision tower of
benchmarks/generate.py also ran ~30% faster unrolled).

On a device mesh (`Engine(..., mesh=...)`), parameters are split by the model's logical-axis
rules (embed over `fsdp`; heads, mlp and vocab over `tensor`), batch rows over `data`, and every
program is traced under `sharding.DECODE_RULES`, so a model larger than one device runs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax import sharding
from llava_jax.config import LlavaConfig
from llava_jax.image_tokens import POOLED_BASE, FeatureMix, as_mix, check_image_tokens
from llava_jax.errors import LlavaJaxError
from llava_jax.infer import sampling
from llava_jax.infer.backend import InferenceLayout, resolve_layout
from llava_jax.infer.sampling import SamplingFlags, SamplingParams, SamplingValues
from llava_jax.models.llama import init_cache
from llava_jax.models.llava import Llava, abstract_params

MAX_EOS_IDS = 4  # EOS ids travel as a fixed-size array (padded with -1) so their number never recompiles


def bucket_length(n: int, minimum: int = 16) -> int:
  """Rounds n up to a multiple of a quarter of the power of two below it (at least `minimum`).

  At most ~25% waste and four buckets per doubling: 26 -> 32, 616 -> 640, 1100 -> 1280.
  """
  if n <= minimum:
    return minimum
  step = max(minimum, (1 << ((n - 1).bit_length() - 1)) // 4)
  return -(-n // step) * step


def bucket_batch(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass
class Prompt:
  """One prompt: token ids (S,) with image tokens already expanded, its tower inputs (M, H, W, 3): images,
  or AnyRes tiles, and image_feature_index (image tokens,): the feature of the M inputs' flattened features
  each image token takes (-1: image_newline, -2 - i: pooled feature i; a FeatureMix: weighted features; see
  models/llava.Llava.embed). Video frames are tower inputs as tiles are; <video> tokens count as image tokens.
  Without an index the k-th image
  token takes feature k (the fixed layout); llava_next prompts need one."""
  input_ids: np.ndarray
  pixel_values: np.ndarray | None = None
  image_feature_index: np.ndarray | FeatureMix | None = None

  @classmethod
  def of(cls, inputs) -> "Prompt":
    """The prompt of one processor.LlavaInputs row."""
    if not len(inputs.pixel_values):
      return cls(inputs.input_ids)
    return cls(inputs.input_ids, inputs.pixel_values, inputs.image_feature_index)

  @property
  def num_tiles(self) -> int:
    return 0 if self.pixel_values is None else len(self.pixel_values)


@dataclasses.dataclass
class Completion:
  tokens: np.ndarray  # generated ids, the EOS that ended the row included
  finish_reason: str  # "stop" (EOS) or "length"


class DecodeState(NamedTuple):
  cache: tuple | dict  # per layer {"k", "v"}: (B·kv_heads, T, head_dim); scanned: {"k", "v"} (layers, B·kv_heads, T, ...)
  kv_mask: jax.Array  # (B, T) bool: slots holding real tokens
  token: jax.Array  # (B,) the last sampled token (fed at the next step)
  step: jax.Array  # () tokens generated so far
  slot: jax.Array  # () the cache slot the next fed token is written to
  done: jax.Array  # (B,) bool
  seen: jax.Array | None  # (B, V) bool, tokens in the sequence (only with a repetition penalty)
  out: jax.Array  # (B, capacity + chunk) int32 generated tokens (pad after a row's EOS)


class DeviceBatch(NamedTuple):
  """Device inputs of one request batch (left padded, batch padded)."""
  input_ids: jax.Array  # (B, P) int32
  prompt_mask: jax.Array  # (B, P) bool
  pixel_values: jax.Array | None  # (B, M, H, W, 3) float32, M a bucketed tile count
  image_feature_index: jax.Array | FeatureMix | None  # (B, P) int32: a row's k-th image token takes feature [b, k]
  live: jax.Array  # (B,) bool: False for the rows that only pad the batch (they start finished)
  rows: int  # number of live rows

  @property
  def arrays(self) -> tuple:
    return self.input_ids, self.prompt_mask, self.pixel_values, self.image_feature_index, self.live


class Engine:
  """Generation for one model; compiled programs are cached per (shapes, static options).

  `params` are in the checkpoint layout (scanned layers), in any floating dtype: the engine holds them once, in
  the compute dtype `config.dtype` (see `in_compute_dtype`). With a `mesh`, they are split over it
  (see `place_on_mesh`); without one, everything lives on the default device. `layout` (a name of
  backend.LAYOUTS or an InferenceLayout) defaults to the backend's. Abstract params (ShapeDtypeStructs)
  make an engine that can only `lower_start` (compile-time measurements).
  """

  def __init__(self, config: LlavaConfig, params, *, eos_token_ids: Sequence[int] | None = None,
               pad_token_id: int | None = None, chunk: int = 8, mesh: Mesh | None = None,
               layout: str | InferenceLayout | None = None):
    self.config = config
    self.layout = resolve_layout(layout)
    self.model = Llava(self.layout.model_config(config))
    self.mesh = mesh
    params = in_compute_dtype(params, config.dtype)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      self.params = jax.eval_shape(self.layout.params, params)
      if mesh is not None:  # placed as place_on_mesh would place them
        placed = sharding.tree_shardings(abstract_params(self.layout.model_config(config)), mesh)
        self.params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.params, placed)
    elif mesh is None:
      self.params = jax.device_put(self.layout.params(params))
    else:
      self.params = place_on_mesh(config, params, mesh, self.layout)
    eos = config.eos_token_id if eos_token_ids is None else eos_token_ids
    self.eos_token_ids = self._eos((eos,) if isinstance(eos, int) else (eos or ()))
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids or (0,))[0]
    self.chunk = chunk
    self._generate = self._on_mesh(jax.jit(self._generate_program, static_argnames=("slots", "flags")))
    self._start_jit = jax.jit(self._start_program, static_argnames=("slots", "flags"))
    self._start = self._on_mesh(self._start_jit)
    self._continue = self._on_mesh(
        jax.jit(self._continue_program, static_argnames=("flags",), donate_argnums=(1,)))
    self._forward = self._on_mesh(jax.jit(self._forward_program))

  def _on_mesh(self, program):
    """The program, called (hence traced) under the mesh and the decode rules; as is without a mesh."""
    if self.mesh is None:
      return program

    def call(*args, **kwargs):
      with sharding.active(self.mesh, sharding.DECODE_RULES):
        return program(*args, **kwargs)
    return call

  # ---- host side ---------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, params: SamplingParams = SamplingParams(),
               eos_token_ids: Sequence[int] | None = None) -> list[Completion]:
    """Generates for every prompt in one compiled program (prefill and the whole decode loop).

    eos_token_ids overrides the engine's EOS ids for this call (an empty list: never stop early).
    """
    batch, slots = self._prepare(prompts, max_new_tokens)
    eos = self._eos(eos_token_ids)
    out, steps, done = self._generate(
        self.params, *batch.arrays, params.values(), jax.random.key(params.seed), self._eos_array(eos),
        jnp.int32(max_new_tokens), slots=slots, flags=params.flags)
    out, steps, done = np.asarray(out), int(steps), np.asarray(done)
    return [Completion(_cut_at_eos(out[i, :steps], eos), "stop" if done[i] else "length") for i in range(batch.rows)]

  def stream(self, prompts: Sequence[Prompt], max_new_tokens: int, params: SamplingParams = SamplingParams(),
             eos_token_ids: Sequence[int] | None = None) -> Iterator[list[np.ndarray]]:
    """Yields, per decode chunk, each row's new tokens (empty once a row has finished).

    The first yield is the first token (right after prefill). Closing the generator early
    (e.g. a stop string was seen) abandons the rest of the work.
    """
    batch, slots = self._prepare(prompts, max_new_tokens)
    eos_ids = self._eos(eos_token_ids)
    flags, values, key, eos = params.flags, params.values(), jax.random.key(params.seed), self._eos_array(eos_ids)
    limit = jnp.int32(max_new_tokens)
    state, report = self._start(self.params, *batch.arrays, values, key, eos, slots=slots, flags=flags)
    finished = np.zeros(batch.rows, bool)
    while True:
      # Dispatch the next chunk before reading this one, so the device does not wait on the host.
      state, next_report = self._continue(self.params, state, values, key, eos, limit, flags=flags)
      window, before, after, done = (np.asarray(x) for x in report)
      new = [window[i, :after - before] if not finished[i] else window[i, :0] for i in range(batch.rows)]
      new = [_cut_at_eos(row, eos_ids) for row in new]
      finished |= done[:batch.rows]
      if any(len(row) for row in new):
        yield new
      if finished.all() or after >= max_new_tokens:
        return
      report = next_report

  def forward(self, prompts: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits (rows, P, V) of the left-padded batch and its (rows, P) mask (for tests, scoring)."""
    batch, _ = self._prepare(prompts, 1)
    logits = self._forward(self.params, *batch.arrays[:4])
    return np.asarray(logits)[:batch.rows], np.asarray(batch.prompt_mask)[:batch.rows]

  def lower_start(self, prompts: Sequence[Prompt], max_new_tokens: int,
                  params: SamplingParams = SamplingParams()) -> jax.stages.Lowered:
    """The first program a request of these prompts runs (prefill and first token), lowered for its shapes:
    `.compile()` on it costs what a new prompt bucket costs."""
    batch, slots = self._prepare(prompts, max_new_tokens)
    return self._on_mesh(self._start_jit.lower)(
        self.params, *batch.arrays, params.values(), jax.random.key(params.seed), self._eos_array(self.eos_token_ids),
        slots=slots, flags=params.flags)

  def _prepare(self, prompts: Sequence[Prompt], max_new_tokens: int) -> tuple[DeviceBatch, int]:
    if not prompts:
      raise LlavaJaxError("generate: no prompts")
    if max_new_tokens < 1:
      raise LlavaJaxError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    indexes = [self._feature_index(i, p) for i, p in enumerate(prompts)]
    rows = bucket_batch(len(prompts))
    if self.mesh is not None:  # batch rows split over `data`
      rows = -(-rows // self.mesh.shape["data"]) * self.mesh.shape["data"]
    length = bucket_length(max(len(p.input_ids) for p in prompts))
    slots = bucket_length(length + max_new_tokens)
    ids = np.full((rows, length), self.pad_token_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i in range(rows):
      row = np.asarray(prompts[min(i, len(prompts) - 1)].input_ids, np.int32)
      ids[i, length - len(row):] = row
      mask[i, length - len(row):] = True
    tiles = max(p.num_tiles for p in prompts)
    pixels = index = None
    if tiles:
      # Rows differ in tile counts (AnyRes: per image size); a bucketed count bounds the compiles.
      shape = next(p.pixel_values.shape[1:] for p in prompts if p.num_tiles)
      pixels = np.zeros((rows, bucket_length(tiles, minimum=1)) + shape, np.float32)
      index = np.zeros((rows, length), np.int32)
      if any(isinstance(x, FeatureMix) for x in indexes):  # OneVision's downscaled images: every row a mix
        indexes, index = [as_mix(x) for x in indexes], as_mix(index)
      for i in range(rows):
        last = min(i, len(prompts) - 1)  # padding rows repeat the last prompt
        p = prompts[last]
        if p.num_tiles:
          if p.pixel_values.shape[1:] != shape:
            raise LlavaJaxError(f"prompt {i}: images of shape {p.pixel_values.shape[1:]}, others have {shape}")
          pixels[i, :p.num_tiles] = p.pixel_values
          for batch_part, row_part in zip(jax.tree.leaves(index), jax.tree.leaves(indexes[last])):
            batch_part[i, :len(row_part)] = row_part
    live = np.arange(rows) < len(prompts)
    put = jnp.asarray
    if self.mesh is not None:
      rows_split = NamedSharding(self.mesh, P("data"))
      put = lambda x: jax.device_put(x, rows_split)
    maybe_put = lambda x: None if x is None else jax.tree.map(put, x)
    return DeviceBatch(put(ids), put(mask), maybe_put(pixels), maybe_put(index), put(live), len(prompts)), slots

  def _feature_index(self, i: int, p: Prompt) -> np.ndarray | FeatureMix:
    """Prompt i's image_feature_index, checked against its image tokens and tiles (the fixed layout's order
    where it has none)."""
    c = self.config
    if len(p.input_ids) == 0:
      raise LlavaJaxError(f"prompt {i} is empty")
    features = p.num_tiles * c.tokens_per_tile
    if p.image_feature_index is None:
      if c.has_image_newline and p.num_tiles:
        raise LlavaJaxError(f"prompt {i}: a {c.model_type} model needs the image_feature_index of its images")
      index = np.arange(features, dtype=np.int32)
    elif isinstance(p.image_feature_index, FeatureMix):
      index = p.image_feature_index
    else:
      index = np.asarray(p.image_feature_index, np.int32)
    entries = index.index if isinstance(index, FeatureMix) else index
    check_image_tokens(p.input_ids, c.media_token_ids, len(entries), f"prompt {i}", f"{p.num_tiles} image tile(s)")
    # negative entries: the newline, then (models pooling frames in the tower) one pooled feature per feature
    lowest = 0 if not c.has_image_newline else -1 if c.spatial_pool_mode is None else POOLED_BASE - (features - 1)
    if len(entries) and (entries.max() >= features or entries.min() < lowest):
      raise LlavaJaxError(f"prompt {i}: image_feature_index outside the {features} features of its image tiles")
    return index

  def _eos(self, ids: Sequence[int] | None) -> tuple[int, ...]:
    if ids is None:
      return self.eos_token_ids
    ids = tuple(int(i) for i in ids)
    if len(ids) > MAX_EOS_IDS:
      raise LlavaJaxError(f"at most {MAX_EOS_IDS} EOS token ids are supported, got {ids}")
    return ids

  @staticmethod
  def _eos_array(ids: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(list(ids) + [-1] * (MAX_EOS_IDS - len(ids)), jnp.int32)

  # ---- device side (traced) ------------------------------------------------------------------

  def _prefill(self, params, input_ids, prompt_mask, pixel_values, feature_index, slots: int,
               last_logits_only: bool = False):
    """Runs the prompt through the model into a fresh cache of `slots` slots, in the model's compute
    dtype (a bfloat16 model keeps a bfloat16 cache).

    The layout's row-by-row prefill runs a batch one row after another (`lax.map`; see
    infer/backend.py); on a mesh the rows are split over devices, so the batch runs at once.
    """
    rows, length = input_ids.shape
    kv_mask = jnp.zeros((rows, slots), bool).at[:, :length].set(prompt_mask)
    dtype = jnp.dtype(self.config.dtype)

    def run(ids, pixels, index, mask):
      cache = init_cache(self.config.text, ids.shape[0], slots, dtype, scanned=not self.layout.unrolled_layers)
      return self.model.apply({"params": params}, ids, pixels, mask, self._constrain(cache), 0, last_logits_only,
                              image_feature_index=index)

    if not self.layout.row_by_row_prefill or self.mesh is not None or rows == 1:
      logits, cache = run(input_ids, pixel_values, feature_index, kv_mask)
    else:
      one_row = lambda x: jax.tree.map(lambda a: a[None], x)
      logits, cache = jax.lax.map(lambda row: run(*(one_row(x) for x in row)),
                                  (input_ids, pixel_values, feature_index, kv_mask))
      # (rows, 1, ...) -> (rows, ...): logits are per row; a cache (rows, [layers,] kv_heads, T, d)
      # -> ([layers,] rows·kv_heads, T, d).
      logits = logits[:, 0]
      merge_rows = lambda c: jnp.moveaxis(c, 0, -4).reshape(c.shape[1:-3] + (-1,) + c.shape[-2:])
      # The barrier keeps the map's stacked output apart from the decode loop that consumes it;
      # fused, XLA:CPU lays the cache out worse for the decode (benchmarks/README.md).
      cache = jax.lax.optimization_barrier(jax.tree.map(merge_rows, cache))
    return logits, self._constrain(cache), kv_mask

  def _constrain(self, cache):
    """On a mesh, pins the caches ([layers,] B·kv_heads, T, head_dim), rows split over `data` as
    the batch is. With one row per data shard, the merged dimension is that row's kv heads and is
    split over `tensor` too, as k_proj/v_proj split them. With more rows, a row's heads are not
    contiguous in it: splitting it over `tensor` then made XLA move weights every step to match,
    so the cache is replicated over `tensor` instead (small activations are gathered)."""
    if self.mesh is None:
      return cache
    leaf = jax.tree.leaves(cache)[0]
    rows = leaf.shape[-3] // self.config.text.num_key_value_heads
    one_row = rows == self.mesh.shape["data"] and self.config.text.num_key_value_heads % self.mesh.shape["tensor"] == 0
    axes = ("data", "tensor") if one_row else "data"
    layers = (None,) * (leaf.ndim - 3)
    return jax.lax.with_sharding_constraint(cache, NamedSharding(self.mesh, P(*layers, axes)))

  def _forward_program(self, params, input_ids, prompt_mask, pixel_values, feature_index):
    return self._prefill(params, input_ids, prompt_mask, pixel_values, feature_index, input_ids.shape[1])[0]

  def _start_program(self, params, input_ids, prompt_mask, pixel_values, feature_index, live, values: SamplingValues,
                     key, eos, *, slots: int, flags: SamplingFlags):
    """Prefill, then the first token. Returns the state and the report of the new token."""
    logits, cache, kv_mask = self._prefill(params, input_ids, prompt_mask, pixel_values, feature_index, slots, True)
    rows, length = input_ids.shape
    seen = None
    if flags.penalty:
      vocab = self.config.text.vocab_size
      # Only real prompt tokens count as seen (transformers also marks its own left padding).
      seen = jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], input_ids].max(prompt_mask)
    capacity = slots - length + 1
    state = DecodeState(
        cache=cache, kv_mask=kv_mask, token=jnp.zeros((rows,), jnp.int32), step=jnp.int32(0),
        slot=jnp.int32(length), done=~live,
        seen=seen, out=jnp.full((rows, capacity + self.chunk), self.pad_token_id, jnp.int32))
    return self._with_report(state, lambda s: self._record(s, logits[:, -1], values, key, eos, flags))

  def _continue_program(self, params, state: DecodeState, values, key, eos, max_new_tokens, *,
                        flags: SamplingFlags):
    """Up to `self.chunk` decode steps (fewer when max_new_tokens is reached or every row is done)."""
    limit = jnp.minimum(max_new_tokens, state.step + self.chunk)
    return self._with_report(state, lambda s: self._decode_loop(params, s, values, key, eos, limit, flags))

  def _with_report(self, state: DecodeState, advance):
    """advance(state) plus what the host needs to stream: the tokens written, the steps, done.

    The report is a separate (small) output, so the host can read it while the state, donated
    to the next chunk, is updated in place.
    """
    new = advance(state)
    window = jax.lax.dynamic_slice_in_dim(new.out, state.step, self.chunk, axis=1)
    return new, (window, state.step, new.step, new.done)

  def _generate_program(self, params, input_ids, prompt_mask, pixel_values, feature_index, live, values, key, eos,
                        max_new_tokens, *, slots: int, flags: SamplingFlags):
    state, _ = self._start_program(params, input_ids, prompt_mask, pixel_values, feature_index, live, values, key,
                                   eos, slots=slots, flags=flags)
    state = self._decode_loop(params, state, values, key, eos, max_new_tokens, flags)
    return state.out, state.step, state.done

  def _decode_loop(self, params, state: DecodeState, values, key, eos, limit, flags) -> DecodeState:
    def step(s: DecodeState) -> DecodeState:
      kv_mask = jax.lax.dynamic_update_slice(s.kv_mask, jnp.ones((s.token.shape[0], 1), bool), (0, s.slot))
      logits, cache = self.model.apply({"params": params}, s.token[:, None], None, kv_mask, s.cache, s.slot)
      s = s._replace(cache=self._constrain(cache), kv_mask=kv_mask, slot=s.slot + 1)
      return self._record(s, logits[:, 0], values, key, eos, flags)

    def running(s: DecodeState):
      return (s.step < limit) & ~jnp.all(s.done)

    return jax.lax.while_loop(running, step, state)

  def _record(self, s: DecodeState, logits, values, key, eos, flags) -> DecodeState:
    """Samples step `s.step`'s token from logits (B, V) and appends it (pad for finished rows)."""
    token = sampling.select_token(logits, flags, values, sampling.step_key(key, s.step), s.seen)
    token = jnp.where(s.done, self.pad_token_id, token)
    seen = s.seen
    if seen is not None:
      seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
    done = s.done | jnp.any(token[:, None] == eos[None, :], axis=-1)
    return s._replace(token=token, step=s.step + 1, done=done, seen=seen, out=out)


# QLoRA's group scales stay float32, as bitsandbytes keeps its absmax: in bf16 they would move every dequantized
# weight by up to 2^-8 of itself. (The quantized codes are integers and stay as they are.)
FLOAT32_WEIGHTS = ("kernel_scale",)


def in_compute_dtype(params, dtype):
  """Every floating weight (but FLOAT32_WEIGHTS) in `dtype`, converted where it lies: host arrays on the host, so
  a device receives only the weights it computes with and the programs read them as they are (no float32 master
  copy, no per-step conversion of the weights); ShapeDtypeStructs as shapes. Already in `dtype`: not copied."""
  dtype = jnp.dtype(dtype)

  def cast(path, x):
    if (not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype
        or getattr(path[-1], "key", None) in FLOAT32_WEIGHTS):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)


def place_on_mesh(config: LlavaConfig, params, mesh: Mesh, layout: InferenceLayout):
  """Checkpoint-layout params -> `layout`'s, split over `mesh` by the logical-axis rules.

  Each device receives only its slice of the checkpoint layout, and the inference layout is computed
  from the slices on the devices, so no device ever holds the whole model. Output-first kernels'
  logical names are reordered with their axes, so their shardings come from the inference model itself.
  """
  stored = sharding.tree_shardings(abstract_params(config.replace(scan_layers=True, out_first_kernels=False)), mesh)
  placed = sharding.tree_shardings(abstract_params(layout.model_config(config)), mesh)
  on_mesh = sharding.place(params, stored)
  return jax.jit(layout.params, out_shardings=placed)(on_mesh)


def _cut_at_eos(tokens: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
  hits = np.flatnonzero(np.isin(tokens, eos_ids))
  return tokens[:hits[0] + 1] if len(hits) else tokens
