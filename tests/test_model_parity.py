"""Our Flax LLaVA computes the logits transformers' PyTorch LLaVA computes (1e-5 relative)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_fixtures import IMAGE_TOKEN, hf_state, our_config, text_with_images, tiny_hf_config, tiny_hf_model
from llava_jax.config import LlavaConfig
from llava_jax.errors import LlavaJaxError
from llava_jax.models.llama import rotary_inv_freq
from llava_jax.models.llava import Llava, unstack_layers
from llava_jax.weights import mapping

TOLERANCE = 1e-5


def relative_error(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def prompt_batch(rng, tokens_per_image, rows=2, length=40, images_per_row=1):
  """Random token rows, each with `images_per_row` runs of image tokens at different places."""
  ids = rng.integers(3, 100, size=(rows, length))
  for row in range(rows):
    start = 1 + row * 3
    for _ in range(images_per_row):
      ids[row, start:start + tokens_per_image] = IMAGE_TOKEN
      start += tokens_per_image + 2
  return ids


def run_both(hf_model, ids, pixels_nchw, attention_mask=None, config=None, params=None):
  config = config or our_config(hf_model)
  params = params or mapping.hf_to_params(hf_state(hf_model).__getitem__, config)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels_nchw),
                   attention_mask=None if attention_mask is None else torch.tensor(attention_mask)).logits.numpy()
  rows = ids.shape[0]
  nhwc = pixels_nchw.transpose(0, 2, 3, 1)
  pixels = jnp.asarray(nhwc.reshape((rows, -1) + nhwc.shape[1:]))  # each row's images, in order
  ours, _ = jax.jit(Llava(config).apply)({"params": params}, jnp.asarray(ids), pixels,
                                         None if attention_mask is None else jnp.asarray(attention_mask))
  return np.asarray(ours), ref


VARIANTS = {
    "vicuna_mha": dict(),
    "mistral_gqa_theta1e6": dict(text="mistral"),
    "projector_act_linear": dict(projector_act="linear"),
    "feature_layer_last_full": dict(feature_layer=-1, strategy="full"),
    "feature_layer_minus2_full": dict(feature_layer=-2, strategy="full"),
    "feature_layer_list": dict(feature_layer=[-2, -3, 0]),
    "tied_embeddings": dict(tie=True),
    "rope_linear_scaling": dict(rope_scaling=2.0),
    "qwen2_gqa_qkv_biases": dict(text="qwen2"),
    "qwen2_tied_embeddings": dict(text="qwen2", tie=True),
    "llama3_gqa_rope_scaling_128k_vocab": dict(text="llama3"),
    "yi_gqa_theta5e6": dict(text="yi"),
    # OneVision's tower choice: SigLIP's last hidden state, every patch (it has no class token), no pooling head.
    "siglip_last_layer_full": dict(vision="siglip", head=False, feature_layer=-1, strategy="full", text="qwen2"),
    # "default" drops SigLIP's first patch, as transformers does; the pooling head is present and unused.
    "siglip_default_pooling_head": dict(vision="siglip", feature_layer=[-2, 0]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
  hf_model = tiny_hf_model(**VARIANTS[variant])
  rng = np.random.default_rng(1)
  ids = prompt_batch(rng, hf_model.config.image_seq_length)
  pixels = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
  ours, ref = run_both(hf_model, ids, pixels)
  assert np.abs(ref).max() > 1.0  # non-trivial logits
  assert relative_error(ours, ref) < TOLERANCE


def test_llama3_rotary_frequencies_equal_transformers():
  """Our rope_type llama3 frequencies are transformers' `_compute_llama3_parameters` (to a float32 ulp: its
  power function rounds differently), and the tiny config puts them in all three of its bands (so the
  parity test above sees the scaling)."""
  hf_config = tiny_hf_config(text="llama3")
  theirs, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config.text_config)
  c = LlavaConfig.from_hf_dict(hf_config.to_dict()).text
  ours = np.asarray(rotary_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=0)
  unscaled = 1 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
  ratio = np.round(unscaled / ours, 4)
  assert ratio[0] == 1 and 1 < ratio[1] < 8 and (ratio[2:] == 8).all(), ratio


def test_two_images_in_one_prompt():
  hf_model = tiny_hf_model()
  rng = np.random.default_rng(2)
  ids = prompt_batch(rng, hf_model.config.image_seq_length, rows=1, length=50, images_per_row=2)
  pixels = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
  ours, ref = run_both(hf_model, ids, pixels)
  assert relative_error(ours, ref) < TOLERANCE
  # The two images land in order: swapping them changes the logits after the first image.
  swapped, _ = run_both(hf_model, ids, pixels[::-1].copy())
  assert relative_error(swapped, ref) > 1e-3


def test_left_padded_batch_matches_at_real_tokens():
  hf_model = tiny_hf_model(text="mistral")
  rng = np.random.default_rng(3)
  tokens = hf_model.config.image_seq_length
  ids = prompt_batch(rng, tokens, length=36)
  mask = np.ones_like(ids)
  pad = 9  # row 0 is shorter: left padding, its image tokens shifted right
  ids[0] = np.concatenate([np.zeros(pad, ids.dtype), ids[0, :-pad]])
  mask[0, :pad] = 0
  pixels = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
  ours, ref = run_both(hf_model, ids, pixels, attention_mask=mask)
  real = mask.astype(bool)
  assert relative_error(ours[real], ref[real]) < TOLERANCE
  # The padded row equals its own unpadded run.
  alone, alone_ref = run_both(hf_model, ids[:1, pad:], pixels[:1])
  assert relative_error(ours[0, pad:], alone[0]) < TOLERANCE
  assert relative_error(alone, alone_ref) < TOLERANCE


def test_single_linear_projector_equals_hf_with_identity_second_layer():
  """LLaVA-1.0's one linear layer == HF's linear_1, identity activation, linear_2 = I."""
  hf_model = tiny_hf_model(projector_act="linear")
  with torch.no_grad():
    hf_model.model.multi_modal_projector.linear_2.weight.copy_(torch.eye(48))
    hf_model.model.multi_modal_projector.linear_2.bias.zero_()
  config = our_config(hf_model).replace(projector_type="linear")
  params = mapping.hf_to_params(hf_state(hf_model).__getitem__, our_config(hf_model))
  del params["projector"]["linear_2"]
  rng = np.random.default_rng(4)
  ids = prompt_batch(rng, hf_model.config.image_seq_length)
  pixels = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
  ours, ref = run_both(hf_model, ids, pixels, config=config, params=params)
  assert relative_error(ours, ref) < TOLERANCE


def test_image_token_count_mismatch_names_both_counts():
  hf_model = tiny_hf_model()
  config = our_config(hf_model)
  params = mapping.hf_to_params(hf_state(hf_model).__getitem__, config)
  ids = np.full((1, 30), 5)
  ids[0, 1:1 + config.image_seq_length - 1] = IMAGE_TOKEN  # one image token short
  pixels = jnp.zeros((1, 1, 28, 28, 3))
  with pytest.raises(LlavaJaxError, match=rf"{config.image_seq_length - 1} image tokens.*{config.image_seq_length}"):
    Llava(config).apply({"params": params}, jnp.asarray(ids), pixels)


def test_unrolled_layers_match_transformers():
  """The decoding layout (layers_{i}, unrolled) computes what the scanned training layout does."""
  hf_model = tiny_hf_model(text="mistral")
  config = our_config(hf_model)
  params = unstack_layers(mapping.hf_to_params(hf_state(hf_model).__getitem__, config))
  for tower in ("vision_tower", "language_model"):
    assert "layers_1" in params[tower] and "layers" not in params[tower]
  rng = np.random.default_rng(5)
  ids = prompt_batch(rng, hf_model.config.image_seq_length)
  pixels = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
  ours, ref = run_both(hf_model, ids, pixels, config=config.replace(scan_layers=False), params=params)
  assert relative_error(ours, ref) < TOLERANCE


def test_sliding_window_matches_transformers_past_the_window():
  """Mistral's sliding window in the full-sequence (training) forward: left-padded prompts of 300+
  tokens, images before and far past a window of 24 tokens."""
  window = 24
  hf_model = tiny_hf_model(text="mistral", sliding_window=window)
  rng = np.random.default_rng(6)
  tokens = hf_model.config.image_seq_length
  pad = 17  # row 1 is shorter: left padding
  ids = np.stack([text_with_images(rng, 310, tokens, (5, 200)),
                  np.concatenate([np.zeros(pad, np.int64), text_with_images(rng, 310 - pad, tokens, (30, 250))])])
  mask = np.ones_like(ids)
  mask[1, :pad] = 0
  pixels = rng.normal(size=(4, 3, 28, 28)).astype(np.float32)
  ours, ref = run_both(hf_model, ids, pixels, attention_mask=mask)
  real = mask.astype(bool)
  assert relative_error(ours[real], ref[real]) < TOLERANCE
  # Without the window, the first `window` tokens agree and every later one differs.
  config = our_config(hf_model)
  unwindowed, _ = run_both(hf_model, ids, pixels, attention_mask=mask,
                           config=config.replace(text=dataclasses.replace(config.text, sliding_window=None)))
  assert relative_error(unwindowed[0, :window], ref[0, :window]) < TOLERANCE
  differences = np.abs(unwindowed[0, window:] - ref[0, window:]).max(axis=-1) / np.abs(ref).max()
  assert differences.min() > 100 * TOLERANCE, differences.min()
