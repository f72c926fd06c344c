"""Inference layouts (infer/backend.py): the backend's choice, every layout's greedy tokens against
transformers' (one code path, prefill row by row or batched, layers unrolled or scanned, on one device and
on a mesh), and the KV cache in the model's compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import hf_state, our_config, tiny_hf_model
from llava_jax import sharding
from llava_jax.errors import LlavaJaxError
from llava_jax.infer import backend
from llava_jax.infer.generate import Engine
from llava_jax.infer.sampling import SamplingParams
from llava_jax.weights.mapping import hf_to_params
from test_generate import NEW_TOKENS, PAD, _hf_generate, _prompts


@pytest.fixture(scope="module")
def gqa():
  hf_model = tiny_hf_model(text="mistral")  # grouped kv heads: the cache's merged (rows·kv_heads) axis matters
  hf_model.generation_config.eos_token_id = None
  config = our_config(hf_model)
  params = hf_to_params(hf_state(hf_model).__getitem__, config)
  prompts = _prompts(config.image_seq_length)
  return config, params, prompts, _hf_generate(hf_model, prompts)


def test_backends_get_their_layouts():
  assert backend.layout_for("cpu") == backend.InferenceLayout("cpu", True, True, True)
  for accelerator in ("gpu", "cuda", "tpu"):
    assert backend.layout_for(accelerator) == backend.InferenceLayout("batched", False, True, True)
  assert backend.resolve_layout(None) == backend.layout_for(jax.default_backend())
  assert backend.resolve_layout("scanned").unrolled_layers is False
  with pytest.raises(LlavaJaxError, match="inference layout must be one of"):
    backend.resolve_layout("fast")
  with pytest.raises(LlavaJaxError, match="output-first kernels need unrolled layers"):
    backend.InferenceLayout("odd", False, False, True)


@pytest.mark.parametrize("layout", sorted(backend.LAYOUTS))
def test_every_layout_generates_transformers_tokens(gqa, layout):
  config, params, prompts, expected = gqa
  engine = Engine(config, params, eos_token_ids=[], pad_token_id=PAD, layout=layout)
  assert engine.layout is backend.LAYOUTS[layout]
  for row, completion in enumerate(engine.generate(prompts, NEW_TOKENS)):
    np.testing.assert_array_equal(completion.tokens, expected[row], err_msg=f"{layout}: row {row}")
  streamed = list(engine.stream(prompts[1:], NEW_TOKENS))
  np.testing.assert_array_equal(np.concatenate([chunk[0] for chunk in streamed]), expected[1])


def test_scanned_layout_on_a_mesh(gqa):
  config, params, prompts, expected = gqa
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  engine = Engine(config, params, eos_token_ids=[], pad_token_id=PAD, mesh=mesh, layout="scanned")
  for row, completion in enumerate(engine.generate(prompts, NEW_TOKENS)):
    np.testing.assert_array_equal(completion.tokens, expected[row], err_msg=f"row {row}")


def _cache_dtypes(engine, prompts):
  """The dtypes of the KV cache the start program hands to the decode loop (traced, not run)."""
  batch, slots = engine._prepare(prompts, NEW_TOKENS)
  sampling = SamplingParams()
  state, _ = jax.eval_shape(
      lambda p, *arrays: engine._start_program(p, *arrays, slots=slots, flags=sampling.flags),
      engine.params, *batch.arrays, sampling.values(), jax.random.key(0), engine._eos_array(()))
  return {leaf.dtype for leaf in jax.tree.leaves(state.cache)}


@pytest.mark.parametrize("layout", ["cpu", "scanned"])
def test_kv_cache_in_the_compute_dtype(gqa, layout):
  config, params, prompts, _ = gqa
  for dtype in ("bfloat16", "float32"):
    engine = Engine(config.replace(dtype=dtype), params, eos_token_ids=[], pad_token_id=PAD, layout=layout)
    assert _cache_dtypes(engine, prompts) == {jnp.dtype(dtype)}


def test_abstract_engine_lowers_the_start_program(gqa):
  """Shapes alone compile the prefill program (what benchmarks/gpu.py times for a new prompt bucket)."""
  config, params, prompts, _ = gqa
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  engine = Engine(config, abstract, eos_token_ids=[], pad_token_id=PAD, layout="cpu")
  compiled = engine.lower_start(prompts, NEW_TOKENS).compile()
  real = Engine(config, params, eos_token_ids=[], pad_token_id=PAD, layout="cpu")
  batch, _ = real._prepare(prompts, NEW_TOKENS)
  sampling = SamplingParams()
  _, report = compiled(real.params, *batch.arrays, sampling.values(), jax.random.key(0), real._eos_array(()))
  first_tokens = np.asarray(report[0])[:len(prompts), 0]
  np.testing.assert_array_equal(first_tokens, [c.tokens[0] for c in real.generate(prompts, 1)])
