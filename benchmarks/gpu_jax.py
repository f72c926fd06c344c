"""benchmarks/gpu.py's JAX parts: the device's peaks, our generation, training step and compile time.

Each part is `run(size, save) -> dict`; `save(partial)` records what has finished so far, so a part
stopped at its time limit still leaves its finished measurements.
"""

from __future__ import annotations

import gc
import platform
import subprocess
import time

from gpu_common import (Size, best_of, decode_weight_bytes, generation_entry, llava_config, pixels, prompt_ids,
                        timed, train_batch, train_flops)


def _jax():
  import jax
  return jax


def peak_memory_bytes() -> int | None:
  stats = _jax().devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def random_params(abstract, seed: int = 0, shardings=None):
  """Random parameters of the (unboxed) abstract tree, made on the device: norm scales 1, biases 0,
  every other weight N(0, 0.02)."""
  jax = _jax()
  import jax.numpy as jnp
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  def make(key):
    out = []
    for (path, leaf), k in zip(leaves, jax.random.split(key, len(leaves))):
      name = str(getattr(path[-1], "key", path[-1]))
      if name == "scale":
        out.append(jnp.ones(leaf.shape, leaf.dtype))
      elif name == "bias":
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
      else:
        out.append(0.02 * jax.random.normal(k, leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
  return jax.jit(make, out_shardings=shardings)(jax.random.key(seed, impl="unsafe_rbg"))


def checkpoint_params(config):
  import flax.linen as nn
  from llava_jax.models.llava import abstract_params
  return random_params(nn.unbox(abstract_params(config)))


# ---- peaks -------------------------------------------------------------------------------------

def peaks(size: Size, save) -> dict:
  """bf16 matmul FLOP/s (n^3), read bandwidth (a float32-accumulated sum over `read_bytes` of bf16) and
  the copy bandwidth of an elementwise pass (bytes read + written), each the best of several runs."""
  jax = _jax()
  import jax.numpy as jnp
  out = {"env": environment()}
  save(out)
  n = size.matmul_n
  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best, _ = best_of(lambda: matmul(a, b).block_until_ready(), 10)
  out["bf16_matmul_tflops"] = 2 * n ** 3 / best / 1e12
  save(out)
  del a, b
  cols = 8192
  rows = size.read_bytes // (2 * cols)
  # Nonzero, varied values (a reduction over zeros can run faster than over real data).
  fill = jax.jit(lambda: ((jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) * 7
                           + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)) % 251 - 125).astype(jnp.bfloat16))
  x = fill()
  total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
  total(x).block_until_ready()
  best, _ = best_of(lambda: total(x).block_until_ready(), 5)
  out["read_bytes"] = int(x.nbytes)
  out["read_bytes_per_s"] = x.nbytes / best
  copy = jax.jit(lambda x: x * 2)
  y = x[:rows // 7]
  copy(y).block_until_ready()
  best, _ = best_of(lambda: copy(y).block_until_ready(), 5)
  out["copy_bytes_per_s_read_plus_write"] = 2 * y.nbytes / best
  return out


def environment() -> dict:
  jax = _jax()
  from importlib import metadata
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "numpy"):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  env = {"devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(), "versions": versions,
         "platform": platform.platform()}
  try:
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
  return env


# ---- generation --------------------------------------------------------------------------------

def _prompts(config, batch: int, text_tokens: int):
  from llava_jax.infer.generate import Prompt
  ids, px = prompt_ids(config, batch, text_tokens), pixels(config, batch)
  return [Prompt(ids[i], px[i]) for i in range(batch)]


def _measure_engine(engine, size: Size, batch: int) -> dict:
  prompts = _prompts(engine.config, batch, size.text_tokens)
  n = size.new_tokens
  # Warm-up compiles the program(s): 1 and 1 + n new tokens share one when their cache buckets agree.
  warm = timed(lambda: (engine.generate(prompts, 1), engine.generate(prompts, 1 + n)))
  _, ttft = best_of(lambda: engine.generate(prompts, 1), size.repeats[batch])
  _, full = best_of(lambda: engine.generate(prompts, 1 + n), size.repeats[batch])
  return generation_entry(batch, n, ttft, full, warm)


def gen_ours(size: Size, save) -> dict:
  """Our Engine (the backend's inference layout) at every batch: TTFT and decode tokens/s."""
  from llava_jax.infer.generate import Engine
  config = llava_config(size).replace(dtype=size.dtype)
  build = time.perf_counter()
  engine = Engine(config, checkpoint_params(config), eos_token_ids=())
  out = {"layout": engine.layout.name, "dtype": size.dtype, "decode_weight_bytes": decode_weight_bytes(config),
         "build_s": time.perf_counter() - build, "batches": {}}
  for batch in size.batches:
    out["batches"][str(batch)] = _measure_engine(engine, size, batch)
    out["peak_mem_bytes"] = peak_memory_bytes()
    save(out)
  return out


def gen_layouts(size: Size, save) -> dict:
  """Batch-1 generation in every other inference layout (same random weights), for the layout decision."""
  from llava_jax.infer import backend
  from llava_jax.infer.generate import Engine
  config = llava_config(size).replace(dtype=size.dtype)
  params = checkpoint_params(config)
  default = backend.layout_for()
  out = {"default": default.name, "decode_weight_bytes": decode_weight_bytes(config), "layouts": {}}
  for layout in backend.LAYOUTS.values():
    if (layout.unrolled_layers, layout.out_first_kernels) == (default.unrolled_layers, default.out_first_kernels):
      continue  # the same program as the default's at batch 1
    engine = Engine(config, params, eos_token_ids=(), layout=layout)
    out["layouts"][layout.name] = _measure_engine(engine, size, 1)
    del engine
    gc.collect()  # the engine's jitted methods hold it in a cycle: free its weights before the next one's
    save(out)
  return out


# ---- training ----------------------------------------------------------------------------------

def train_ours(size: Size, save) -> dict:
  """One optimizer step of the Trainer that `llava-jax train` builds (configs/llava_v1_5.py), per case."""
  jax = _jax()
  from configs import llava_v1_5
  from llava_jax.data.pipeline import make_global_batch
  from llava_jax.train import build
  out = {}
  for case in size.train:
    cfg = llava_v1_5.get_config(f"stage={case.stage},size={size.recipe_size}")
    cfg.batch_size = case.batch
    config = llava_config(size, case.layers).replace(dtype=cfg.dtype, remat_policy=cfg.remat_policy)
    trainer = build.build_trainer(cfg, config, total_steps=1000)
    import flax.linen as nn
    params = random_params(nn.unbox(trainer.abstract_params), shardings=trainer.param_shardings)
    state = trainer.init_state(params)
    batch = make_global_batch(train_batch(config, case), trainer.mesh)
    holder = {"state": state}

    def step():
      holder["state"], metrics = trainer.step(holder["state"], batch)
      holder["loss"] = float(metrics["loss"])  # waits for the step

    first = timed(step)
    best, times = best_of(step, size.train_steps)
    flops = train_flops(config, case)
    out[case.name] = {"step_s": best, "steps_s": times, "first_step_incl_compile_s": first,
                      "samples_per_s": case.batch / best, "tokens_per_s": case.batch * case.length / best,
                      "model_flops_per_step": flops, "model_tflops_per_s": flops / best / 1e12,
                      "loss": holder["loss"], "remat": cfg.remat_policy, "dtype": cfg.dtype,
                      "layers": config.text.num_hidden_layers, "batch": case.batch, "length": case.length,
                      "peak_mem_bytes": peak_memory_bytes()}
    del holder, state, params, trainer
    gc.collect()
    save(out)
  return out


# ---- compile time ------------------------------------------------------------------------------

def compile_time(size: Size, save) -> dict:
  """Lowering and compiling the first program of a new prompt bucket (prefill + first token, batch 1) on
  abstract weights: no weights are made, so this runs on a CPU at 7B shapes too."""
  jax = _jax()
  jax.config.update("jax_enable_compilation_cache", False)  # a cached executable would hide the compile
  import flax.linen as nn
  from llava_jax.infer import backend
  from llava_jax.infer.generate import Engine, Prompt
  from llava_jax.models.llava import abstract_params
  config = llava_config(size).replace(dtype=size.dtype)
  abstract = nn.unbox(abstract_params(config))
  text = size.compile_prompt - 1 - config.tokens_per_tile
  prompt = Prompt(prompt_ids(config, 1, text)[0], pixels(config, 1)[0])
  default = backend.layout_for()
  out = {"prompt_tokens": size.compile_prompt, "backend": jax.default_backend(), "default": default.name,
         "layouts": {}}
  for layout in [default] + [l for l in backend.LAYOUTS.values() if l.unrolled_layers != default.unrolled_layers]:
    engine = Engine(config, abstract, eos_token_ids=(), layout=layout)
    start = time.perf_counter()
    lowered = engine.lower_start([prompt], 1)
    lowered_s = time.perf_counter() - start
    compile_s = timed(lowered.compile)
    out["layouts"][layout.name] = {"lower_s": lowered_s, "compile_s": compile_s}
    save(out)
  return out


# ---- attention kernels ---------------------------------------------------------------------------

PACKED_SAMPLES = 4  # samples per packed row; the row ends in PADDING slots of padding
PADDING = 16


def packed_segments(tokens: int):
  """(1, tokens) segment ids: PACKED_SAMPLES equal samples, the last one PADDING slots short (padding)."""
  import numpy as np
  ids = np.repeat(np.arange(1, PACKED_SAMPLES + 1), tokens // PACKED_SAMPLES)
  ids[-PADDING:] = 0
  return ids[None].astype(np.int32)


def attention_kernels(size: Size, save) -> dict:
  """Causal self-attention alone (forward + gradients w.r.t. q, k, v) on one packed row, in the einsum
  path, its block-skipping form and every flash kernel this backend runs (models/attention.select_kernel):
  the time at size.attention's length, and each kernel's largest error against the float32 einsum at a
  quarter of it (outputs and gradients, relative to their largest magnitude), in bf16 and float32."""
  jax = _jax()
  import jax.numpy as jnp
  from llava_jax.models import attention
  from llava_jax.models.llava import attention_layout
  tokens, heads, kv_heads, head_dim = size.attention
  backend = jax.default_backend()
  flash = [k for k in ("cudnn", "splash")
           if attention.select_kernel(k, backend=backend, dtype=jnp.bfloat16, head_dim=head_dim, queries=tokens,
                                      keys=tokens, mask="segments") == k]
  variants = {"xla": dict(kernel="xla"), "xla_blocks": dict(kernel="xla", skip_masked_blocks=True)}
  variants.update({k: dict(kernel=k) for k in flash})

  def inputs(length: int, dtype):
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (1, length, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (kv_heads, length, head_dim), dtype) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    segments = jnp.asarray(packed_segments(length))
    _, dense = attention_layout(segments, length, 0)
    return (q, k, v), attention.AttentionMask(dense, segments), cotangent

  def forward_and_grads(options):
    def loss(q, k, v, mask, cotangent):
      out = attention.dot_product_attention(q, k, v, mask, head_dim ** -0.5, causal=True, **options)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  def err(got, ref):  # the largest deviation, relative to the reference's largest magnitude
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))

  out = {"backend": backend, "tokens": tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
         "samples_per_row": PACKED_SAMPLES, "flash_kernels": flash, "errors": {}, "seconds": {}}
  check = max(tokens // 4, 2 * PADDING * PACKED_SAMPLES)
  real = packed_segments(check)[0] > 0  # padding queries' outputs are unspecified
  for dtype in (jnp.float32, jnp.bfloat16):
    (q, k, v), mask, cotangent = inputs(check, dtype)
    cotangent = cotangent * real[None, :, None, None]
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, ref), ref_grads = forward_and_grads(variants["xla"])(*upcast, mask, cotangent)
    for name, options in variants.items():
      (_, got), grads = forward_and_grads(options)(q, k, v, mask, cotangent)
      out["errors"].setdefault(name, {})[jnp.dtype(dtype).name] = {
          "output": err(got[:, real], ref[:, real]),
          "grads": max(err(g, r) for g, r in zip(grads, ref_grads))}
    save(out)
  (q, k, v), mask, cotangent = inputs(tokens, jnp.bfloat16)
  for name, options in variants.items():
    step = forward_and_grads(options)
    run = lambda: jax.block_until_ready(step(q, k, v, mask, cotangent))
    run()
    out["seconds"][name], _ = best_of(run, 5)
    save(out)
  out["speedup_vs_einsum"] = {name: out["seconds"]["xla"] / s for name, s in out["seconds"].items()}
  return out


PARTS = {"peaks": peaks, "attention": attention_kernels, "gen_ours": gen_ours, "gen_layouts": gen_layouts, "train_ours": train_ours,
         "compile": compile_time}
