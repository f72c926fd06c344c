"""Sampling as pure functions on hand-made logits, checked against transformers' logits processors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.generation.logits_process as hf

from hf_fixtures import IMAGE_TOKEN, hf_state, our_config, tiny_hf_model
from llava_jax.errors import LlavaJaxError
from llava_jax.infer import sampling
from llava_jax.infer.generate import Engine, Prompt
from llava_jax.infer.sampling import SamplingParams
from llava_jax.weights.mapping import hf_to_params


def _kept(filtered):
  return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(filtered)]


def test_top_k_keeps_the_k_largest_and_ties_at_the_boundary():
  logits = jnp.asarray([[1.0, 3.0, 2.0, 3.5, 0.0], [5.0, 4.0, 4.0, 1.0, 4.0]])
  assert _kept(sampling.top_k_filter(logits, jnp.int32(2))) == [{1, 3}, {0, 1, 2, 4}]
  assert _kept(sampling.top_k_filter(logits, jnp.int32(3))) == [{1, 2, 3}, {0, 1, 2, 4}]
  assert _kept(sampling.top_k_filter(logits, jnp.int32(1))) == [{3}, {0}]


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.asarray([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
  logits = jnp.asarray(np.log(probs)[None], jnp.float32)
  for p, want in [(0.3, {1}), (0.5, {1}), (0.6, {1, 3}), (0.79, {1, 3}), (0.81, {1, 3, 2}), (0.96, {0, 1, 2, 3})]:
    assert _kept(sampling.top_p_filter(logits, jnp.float32(p))) == [want], p


@pytest.mark.parametrize("seed", [0, 1])
def test_processing_matches_transformers_processors(seed):
  """Penalty, temperature, top-k and top-p in transformers' order, on random logits."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
  history = rng.integers(0, 50, (3, 12))
  seen = np.zeros((3, 50), bool)
  np.put_along_axis(seen, history, True, axis=1)
  params = SamplingParams(temperature=0.7, top_k=9, top_p=0.8, repetition_penalty=1.3)
  ours = sampling.process_logits(jnp.asarray(logits), params.flags, params.values(), jnp.asarray(seen))
  processors = hf.LogitsProcessorList([
      hf.RepetitionPenaltyLogitsProcessor(1.3), hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(9),
      hf.TopPLogitsWarper(0.8)])
  ref = processors(torch.from_numpy(history), torch.from_numpy(logits)).numpy()
  assert _kept(ours) == _kept(ref)
  finite = np.isfinite(ref)
  np.testing.assert_allclose(np.asarray(ours)[finite], ref[finite], rtol=1e-6)


def test_repetition_penalty_hand_example():
  logits = jnp.asarray([[2.0, -1.0, 0.5, -3.0]])
  seen = jnp.asarray([[True, True, False, False]])
  out = sampling.apply_repetition_penalty(logits, seen, jnp.float32(2.0))
  np.testing.assert_allclose(np.asarray(out), [[1.0, -2.0, 0.5, -3.0]])
  ref = hf.RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 1]]), torch.tensor(np.asarray(logits)))
  np.testing.assert_allclose(np.asarray(out), ref.numpy())


def test_seeded_draws_are_reproducible_and_stay_in_the_candidate_set():
  logits = jnp.tile(jnp.asarray([[0.0, 2.0, 1.0, 2.5, -1.0, 1.9]]), (256, 1))
  params = SamplingParams(temperature=2.0, top_k=3)
  draw = lambda seed: np.asarray(sampling.select_token(logits, params.flags, params.values(), jax.random.key(seed)))
  np.testing.assert_array_equal(draw(7), draw(7))
  assert not np.array_equal(draw(7), draw(8))
  assert set(draw(7).tolist()) == {1, 3, 5}  # 256 draws hit every kept token and nothing else


def test_greedy_is_argmax():
  logits = jnp.asarray([[0.1, 0.9, 0.3], [2.0, -1.0, 1.0]])
  params = SamplingParams()
  tokens = sampling.select_token(logits, params.flags, params.values(), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(tokens), [1, 0])


def test_invalid_parameters():
  for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0)]:
    with pytest.raises(LlavaJaxError):
      SamplingParams(**bad)


def test_engine_sampling_is_seeded():
  hf_model = tiny_hf_model()
  config = our_config(hf_model)
  engine = Engine(config, hf_to_params(hf_state(hf_model).__getitem__, config), eos_token_ids=[])
  ids = np.asarray([1, 5, 9] + [IMAGE_TOKEN] * config.image_seq_length + [20, 30], np.int32)
  prompt = Prompt(ids, np.random.default_rng(0).standard_normal((1, 28, 28, 3)).astype(np.float32))
  run = lambda seed: engine.generate([prompt], 16, SamplingParams(
      temperature=1.5, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=seed))[0].tokens
  first = run(3)
  np.testing.assert_array_equal(first, run(3))
  assert not np.array_equal(first, run(4))
