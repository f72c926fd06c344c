"""The generation engine against transformers' generate on tiny random LLaVA models.

Each variant builds ONE batched program (two left-padded prompts with two images each, image
tokens at the start, middle and end) and compares it with transformers' batched generate and
with its single-prompt generates. Variants are combined (e.g. GQA + linear projector + tied
embeddings in one model) so every architectural feature is covered with few compiles.
"""

import numpy as np
import pytest
import torch

from hf_fixtures import IMAGE_TOKEN, hf_state, our_config, text_with_images, tiny_hf_model
from llava_jax.errors import LlavaJaxError
from llava_jax.infer.generate import Engine, Prompt, bucket_length
from llava_jax.weights.mapping import hf_to_params

NEW_TOKENS = 20
PAD = 0

VARIANTS = {
    "llama_mha": {},
    "mistral_gqa_linear_tied": {"text": "mistral", "projector_act": "linear", "tie": True},
    "last_layer_full": {"feature_layer": -1, "strategy": "full"},
    "layer_list": {"feature_layer": [-2, 0]},
    # The 35-token prompt crosses the window while decoding; the 42-token one starts past it.
    "mistral_window_crossed_in_decode": {"text": "mistral", "sliding_window": 40},
    "qwen2_gqa_qkv_biases": {"text": "qwen2"},
    "qwen2_tied": {"text": "qwen2", "tie": True},
    "llama3_rope_scaling_128k_vocab": {"text": "llama3"},
    "siglip_last_layer_full_qwen2": {"vision": "siglip", "head": False, "feature_layer": -1, "strategy": "full",
                                     "text": "qwen2"},
}
LONG_WINDOW = 24


def _prompts(tokens_per_image, seed=0):
  """Two prompts of different lengths, two images each; text ids avoid pad/bos/eos and the image id."""
  rng = np.random.default_rng(seed)
  text = lambda n: list(rng.integers(3, IMAGE_TOKEN, n))
  image = [IMAGE_TOKEN] * tokens_per_image
  rows = [[1] + text(3) + image + text(4) + image + text(2), [1] + image + text(2) + image]
  pixels = rng.standard_normal((2, 2, 28, 28, 3)).astype(np.float32)
  return [Prompt(np.asarray(r, np.int32), px) for r, px in zip(rows, pixels)]


def _hf_generate(hf_model, prompts, **kwargs):
  """transformers' greedy generate on the left-padded batch; returns the new tokens per row."""
  width = max(len(p.input_ids) for p in prompts)
  ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, width - len(p.input_ids):] = torch.from_numpy(p.input_ids.astype(np.int64))
    mask[i, width - len(p.input_ids):] = 1
  pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in prompts])).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                            max_new_tokens=NEW_TOKENS, pad_token_id=PAD, **kwargs)
  return out[:, width:].numpy()


def _long_prompts(tokens_per_image, seed=1):
  """Two prompts over 300 tokens, two images each (one far past the other): left padded into a 320 bucket,
  the longer one fills two attention blocks of 128 queries and part of a third."""
  rng = np.random.default_rng(seed)
  rows = [text_with_images(rng, 313, tokens_per_image, (41, 257)),
          text_with_images(rng, 290, tokens_per_image, (1, 167))]
  pixels = rng.standard_normal((2, 2, 28, 28, 3)).astype(np.float32)
  return [Prompt(r.astype(np.int32), px) for r, px in zip(rows, pixels)]


def _engine(hf_model) -> Engine:
  hf_model.generation_config.eos_token_id = None  # random weights: make sure all 20 tokens are produced
  config = our_config(hf_model)
  return Engine(config, hf_to_params(hf_state(hf_model).__getitem__, config), eos_token_ids=[], pad_token_id=PAD)


def _setup(variant):
  hf_model = tiny_hf_model(**VARIANTS[variant])
  engine = _engine(hf_model)
  return hf_model, engine, _prompts(engine.config.image_seq_length)


@pytest.fixture(scope="module")
def llama():
  return _setup("llama_mha")


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "llama_mha"])
def test_greedy_batch_matches_transformers(variant):
  _check_batch(*_setup(variant))


def test_greedy_batch_matches_transformers_llama(llama):
  _check_batch(*llama)


def _check_batch(hf_model, engine, prompts):
  ours = engine.generate(prompts, NEW_TOKENS)
  batched = _hf_generate(hf_model, prompts)
  for row, (completion, prompt) in enumerate(zip(ours, prompts)):
    assert len(completion.tokens) == NEW_TOKENS and completion.finish_reason == "length"
    np.testing.assert_array_equal(completion.tokens, batched[row], err_msg=f"row {row} vs HF batched")
    np.testing.assert_array_equal(completion.tokens, _hf_generate(hf_model, [prompt])[0],
                                  err_msg=f"row {row} vs HF single prompt")


def test_rows_equal_single_prompt_streamed_runs(llama):
  """Each batch row equals its own batch-1 run, and streaming (chunked decode) equals one-shot."""
  _, engine, prompts = llama
  batched = engine.generate(prompts, NEW_TOKENS)
  for prompt, completion in zip(prompts, batched):
    chunks = list(engine.stream([prompt], NEW_TOKENS))
    assert len(chunks) > 2 and len(chunks[0][0]) == 1  # the first token arrives alone, right after prefill
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), completion.tokens)


def test_stops_at_eos_per_row(llama):
  hf_model, engine, prompts = llama
  free = engine.generate(prompts, NEW_TOKENS)
  eos = int(free[0].tokens[5])  # row 0 stops at step 5 (or earlier if that id came before)
  ours = engine.generate(prompts, NEW_TOKENS, eos_token_ids=[eos, 126])
  reference = _hf_generate(hf_model, prompts, eos_token_id=[eos, 126])
  first = list(free[0].tokens).index(eos)
  np.testing.assert_array_equal(ours[0].tokens, free[0].tokens[:first + 1])
  assert ours[0].finish_reason == "stop"
  for row, completion in enumerate(ours):
    n = len(completion.tokens)
    np.testing.assert_array_equal(completion.tokens, reference[row][:n])
    assert (reference[row][n:] == PAD).all()  # transformers pads a finished row


def _hf_prefill_logits(hf_model, prompts, mask: np.ndarray) -> np.ndarray:
  """transformers' logits for the prompts left padded to the engine's (rows, width) `mask`."""
  width = mask.shape[1]
  ids = np.full((len(prompts), width), PAD, np.int64)
  for i, p in enumerate(prompts):
    ids[i, width - len(p.input_ids):] = p.input_ids
  pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in prompts])).permute(0, 3, 1, 2)
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    pixel_values=pixels).logits.numpy()


def test_prefill_logits_match_transformers_left_padded(llama):
  _check_prefill_logits(*llama)


@pytest.mark.parametrize("variant", ["qwen2_gqa_qkv_biases", "qwen2_tied", "llama3_rope_scaling_128k_vocab"])
def test_prefill_logits_match_transformers_decoder_families(variant):
  """The decode layout's biases, tied head and rope scaling, where tiny tied models' greedy tokens repeat."""
  _check_prefill_logits(*_setup(variant))


def _check_prefill_logits(hf_model, engine, prompts):
  logits, mask = engine.forward(prompts)
  ref = _hf_prefill_logits(hf_model, prompts, mask)
  valid = mask.astype(bool)
  error = np.abs(logits[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
  assert error < 1e-5, error
  return mask


@pytest.fixture(scope="module", params=[None, LONG_WINDOW], ids=["full_attention", "sliding_window"])
def long_mistral(request):
  hf_model = tiny_hf_model(text="mistral", sliding_window=request.param)
  engine = _engine(hf_model)
  return hf_model, engine, _long_prompts(engine.config.image_seq_length)


def test_long_prompt_prefill_logits_match_transformers(long_mistral):
  """The prefill's block-by-block causal attention (and the window's skipped keys) on prompts over 300 tokens."""
  mask = _check_prefill_logits(*long_mistral)
  prompts = long_mistral[2]
  assert mask.shape[1] == 320 and min(len(p.input_ids) for p in prompts) > 256  # blocks of 128: 2 full, 1 partial


def test_long_prompt_greedy_batch_matches_transformers(long_mistral):
  _check_batch(*long_mistral)


def test_sliding_window_decides_the_long_generations():
  """transformers generates other tokens for the long prompts without the window, so the parity
  tests above fail if the window is not applied."""
  prompts = _long_prompts(tiny_hf_model().config.image_seq_length)
  windowed = _hf_generate(tiny_hf_model(text="mistral", sliding_window=LONG_WINDOW), prompts)
  unwindowed = _hf_generate(tiny_hf_model(text="mistral"), prompts)
  assert all((w != u).any() for w, u in zip(windowed, unwindowed))


def test_bad_requests(llama):
  _, engine, prompts = llama
  with pytest.raises(LlavaJaxError, match="image tokens but its 1 image tile"):
    engine.generate([Prompt(prompts[0].input_ids, prompts[0].pixel_values[:1])], 4)
  with pytest.raises(LlavaJaxError, match="max_new_tokens"):
    engine.generate(prompts, 0)


def test_buckets():
  assert [bucket_length(n) for n in (1, 16, 17, 26, 33, 48, 49, 616, 1000, 1100)] == [
      16, 16, 32, 32, 48, 48, 64, 640, 1024, 1280]
