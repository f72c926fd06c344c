"""Every attention kernel equals the einsum path (models/attention.xla_attention) on forward and gradients.

The GPU and TPU kernels run here under `emulated_kernels`: cuDNN's call with jax.nn's XLA implementation
substituted (the same arguments: layout, grouped heads, causal flag, mask, window), splash in Pallas interpret
mode. Rows cover grouped KV heads (8 query heads over 2), left and right padding and a packed row of three
samples; the masks come from models/llava.attention_layout, as in the model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llava_jax import sharding
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.models import attention
from llava_jax.models.attention import AttentionMask, dot_product_attention, select_kernel, xla_attention
from llava_jax.models.llava import Llava, attention_layout

HEADS, KV_HEADS, HEAD_DIM, LENGTH = 8, 2, 16, 256
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def segment_rows(length: int) -> np.ndarray:
  """Left padded, right padded, three packed samples followed by padding, and one sample filling its row
  (4 rows: one per batch device of the meshes below)."""
  rows = np.zeros((4, length), np.int32)
  rows[0, 37:] = 1
  rows[1, :length - 90] = 1
  rows[2, :70], rows[2, 70:150], rows[2, 150:length - 20] = 1, 2, 3
  rows[3] = 1
  return rows


def relative_error(ours, ref, rows) -> float:
  ours, ref = np.asarray(ours, np.float32)[rows], np.asarray(ref, np.float32)[rows]
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def attention_call(kernel, mask, window):
  """(q, k, v) -> the output of one causal self-attention call (`kernel` "reference": the einsum path itself)."""
  def run(q, k, v):
    if kernel == "reference":
      return xla_attention(q, k, v, mask.dense, HEAD_DIM ** -0.5)
    return dot_product_attention(q, k, v, mask, HEAD_DIM ** -0.5, kernel=kernel, causal=True, sliding_window=window,
                                 skip_masked_blocks=kernel == "xla")
  return run


def outputs_and_grads(kernel, q, k, v, mask, cotangent, window):
  """The attention output and the gradients of <output, cotangent> w.r.t. q, k, v (cotangent zero at padding)."""
  with attention.emulated_kernels():
    out, pullback = jax.vjp(jax.jit(attention_call(kernel, mask, window)), q, k, v)
    return out, pullback(cotangent.astype(out.dtype))


@functools.lru_cache(maxsize=None)
def case(window, dtype):
  """The inputs of one (window, dtype) case and the einsum path's output and gradients on them."""
  segments = segment_rows(LENGTH)
  _, dense = attention_layout(jnp.asarray(segments), LENGTH, 0, window)
  mask = AttentionMask(dense, jnp.asarray(segments))
  keys = jax.random.split(jax.random.key(0), 4)
  b = segments.shape[0]
  q = jax.random.normal(keys[0], (b, LENGTH, HEADS, HEAD_DIM), dtype)
  k, v = (jax.random.normal(key, (b * KV_HEADS, LENGTH, HEAD_DIM), dtype) for key in keys[1:3])
  real = segments > 0  # a padding query's output is unspecified (it sees its own segment, or nothing)
  cotangent = jax.random.normal(keys[3], q.shape) * real[:, :, None, None]
  inputs = (q, k, v, mask, cotangent, window)
  return inputs, real, outputs_and_grads("reference", *inputs)


def assert_equal_to_reference(out, grads, ref, ref_grads, real, tol):
  assert relative_error(out, ref, real) <= tol
  real_kv = np.repeat(real, KV_HEADS, axis=0)  # heads-major rows: batch row b's heads are rows b*K .. b*K+K-1
  for name, ours, theirs, rows in zip("qkv", grads, ref_grads, (real, real_kv, real_kv)):
    assert relative_error(ours, theirs, rows) <= tol, name
    assert not np.asarray(ours, np.float32)[~rows].any(), f"d{name} at padding"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 100], ids=["causal", "sliding_window"])
@pytest.mark.parametrize("kernel", ["xla", "cudnn", "splash"])
def test_kernels_equal_the_einsum_path(kernel, window, dtype):
  inputs, real, (ref, ref_grads) = case(window, dtype)
  out, grads = outputs_and_grads(kernel, *inputs)
  assert_equal_to_reference(out, grads, ref, ref_grads, real, TOLERANCE[dtype])


def shard_maps(jaxpr):
  """Every shard_map equation in a jaxpr, nested ones (inside jit, custom_vjp, ...) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from shard_maps(sub)


def primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          names |= primitives(sub)
  return names


@pytest.mark.parametrize("kernel, mesh_spec", [
    ("splash", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("splash", {"data": 1, "fsdp": 4, "tensor": 2}),
    ("cudnn", {"data": 2, "fsdp": 2, "tensor": 2}),
], ids=["splash-data2-fsdp2-tensor2", "splash-fsdp4-tensor2", "cudnn-data2-fsdp2-tensor2"])
def test_flash_kernels_run_per_shard_on_a_mesh(kernel, mesh_spec):
  """Under the training rules, each device runs the kernel on its row (batch over data x fsdp = 4) and its 4 of
  the 8 query heads with their 1 of the 2 KV heads (tensor = 2), forward and backward; the result is the einsum
  path's."""
  inputs, real, (ref, ref_grads) = case(None, jnp.float32)
  q, k, v, mask, cotangent, _ = inputs
  with sharding.active(sharding.make_mesh(mesh_spec)):
    out, grads = outputs_and_grads(kernel, *inputs)
    with attention.emulated_kernels():
      run = attention_call(kernel, mask, None)
      jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(run, q, k, v)[1](cotangent))(q, k, v).jaxpr
  assert_equal_to_reference(out, grads, ref, ref_grads, real, 1e-5)
  maps = list(shard_maps(jaxpr))
  assert len(maps) >= 2  # the forward, and the backward (its transpose)
  local_q, local_kv = (1, LENGTH, HEADS // 2, HEAD_DIM), (1, KV_HEADS // 2, LENGTH, HEAD_DIM)
  for eqn in maps:
    assert "pallas_call" in primitives(eqn.params["jaxpr"]) or kernel == "cudnn"
    body = eqn.params["jaxpr"]
    local = [var.aval.shape for var in body.invars + body.outvars]  # forward: q, k, v in; backward: dq, dk, dv out
    assert local_q in local and local_kv in local, local


def test_mesh_that_cannot_split_the_kv_heads_falls_back_to_xla():
  """tensor = 4 over 2 KV heads: the call runs on xla (no shard_map, no Pallas call) and a warning says why."""
  inputs, real, (ref, _) = case(None, jnp.float32)
  q, k, v, mask = inputs[:4]
  with sharding.active(sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})), attention.emulated_kernels():
    run = attention_call("splash", mask, None)
    with pytest.warns(UserWarning, match="splash runs as xla on this mesh: KV heads 2 do not divide mesh axes "
                                         "tensor of size 4"):
      names = primitives(jax.make_jaxpr(run)(q, k, v).jaxpr)
    out = jax.jit(run)(q, k, v)
  assert "shard_map" not in names and "pallas_call" not in names
  assert relative_error(out, ref, real) <= 1e-5


def test_unmasked_attention_of_the_vision_towers():
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (2, 128, 4, HEAD_DIM))
  k, v = (jax.random.normal(key, (2 * 4, 128, HEAD_DIM)) for key in keys[1:])
  ref = xla_attention(q, k, v, None, 0.25)
  for kernel in ("cudnn", "splash"):
    with attention.emulated_kernels():
      out = jax.jit(lambda q, k, v, kernel=kernel: dot_product_attention(q, k, v, None, 0.25, kernel=kernel))(q, k, v)
    assert relative_error(out, ref, slice(None)) <= 1e-5, kernel


def test_select_kernel():
  def pick(requested, backend="gpu", dtype=jnp.bfloat16, head_dim=128, queries=4096, keys=4096, mask="segments"):
    return select_kernel(requested, backend=backend, dtype=dtype, head_dim=head_dim, queries=queries, keys=keys,
                         mask=mask)
  assert pick("auto") == "cudnn"
  assert pick("auto", dtype=jnp.float16, mask="none", queries=577, keys=577) == "cudnn"  # a CLIP tower
  assert pick("auto", dtype=jnp.float32) == "xla"
  assert pick("auto", head_dim=12) == "xla"
  assert pick("auto", queries=4095, keys=4095) == "xla"  # cuDNN's masked training needs an even length
  assert pick("auto", mask="dense", queries=1) == "xla"  # a decode step
  assert pick("auto", backend="tpu", dtype=jnp.float32) == "splash"
  assert pick("auto", backend="tpu", mask="none", queries=577, keys=577) == "xla"
  assert pick("auto", backend="cpu") == "xla"
  assert pick("splash") == "xla" and pick("cudnn", backend="tpu") == "xla"
  assert pick("xla") == "xla"
  with attention.emulated_kernels():
    assert pick("cudnn", backend="cpu", dtype=jnp.float32) == "cudnn"
    assert pick("splash", backend="cpu") == "splash"
    assert pick("auto", backend="cpu") == "xla"


def test_config_rejects_an_unknown_kernel():
  with pytest.raises(LlavaJaxError, match="attention must be one of .*'flash'"):
    LlavaConfig(attention="flash")


def tiny_config() -> LlavaConfig:
  """A 2-layer LLaVA with 16-wide heads (cuDNN's multiple of 8) and grouped KV heads."""
  vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                        image_size=28, patch_size=7)
  text = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
  return LlavaConfig(vision=vision, text=text, image_token_index=127, image_seq_length=16, attention="xla")


@pytest.fixture(scope="module")
def tiny_model():
  config = tiny_config()
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 127, (2, 128)).astype(np.int32)
  ids[:, 5:21] = 127  # each row's image, in its first sample
  pixels = rng.standard_normal((2, 1, 28, 28, 3)).astype(np.float32)
  params = nn.unbox(jax.jit(Llava(config).init)(jax.random.key(0), ids, pixels, np.ones_like(ids))["params"])
  params = jax.tree.map(lambda x: x * 4, params)  # sharper attention than init's, so a masking error shows
  return config, params, ids, pixels


@pytest.mark.parametrize("kernel", ["cudnn", "splash"])
def test_model_logits_equal_across_kernels(tiny_model, kernel, kernel_calls):
  config, params, ids, pixels = tiny_model
  segments = np.zeros_like(ids)
  segments[0, :100] = 1  # right padded
  segments[1, :60], segments[1, 60:110] = 1, 2  # two packed samples, then padding

  def logits(attention_kernel):
    with attention.emulated_kernels():
      model = Llava(config.replace(attention=attention_kernel))
      return np.asarray(jax.jit(model.apply)({"params": params}, ids, pixels, segments)[0])
  real = segments > 0
  assert relative_error(logits(kernel), logits("xla"), real) <= 1e-5
  # Both decoder layers; cuDNN also runs both vision layers (splash does not fit their 17 tokens).
  assert kernel_calls[kernel] == (4 if kernel == "cudnn" else 2)


def test_greedy_generation_identical_across_kernels(tiny_model, kernel_calls):
  """Also splash on a mesh, under the inference rules: rows over `data`, heads over `tensor`, `fsdp` replicated."""
  config, params, ids, pixels = tiny_model
  prompts = [Prompt(ids[0, :120], pixels[0]), Prompt(ids[1, :97], pixels[1])]  # left padded to a 128 bucket
  tokens = {}
  for kernel, mesh in (("xla", None), ("cudnn", None), ("splash", None),
                       ("splash", sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))):
    with attention.emulated_kernels():
      engine = Engine(config.replace(attention=kernel), params, eos_token_ids=[], pad_token_id=0, mesh=mesh)
      tokens[kernel, mesh] = [c.tokens for c in engine.generate(prompts, 6)]
  for (kernel, mesh), ours in tokens.items():
    np.testing.assert_array_equal(ours, tokens["xla", None], err_msg=f"{kernel} on {mesh}")
  # Traced layers: cuDNN's in the prefill's decoder and the vision tower; splash's in the decoder, twice (a mesh).
  assert kernel_calls == {"cudnn": 4, "splash": 4}
