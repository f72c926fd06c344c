"""The SigLIP vision tower against transformers' SiglipVisionModel: every hidden state, the post-layernorm and
pooled outputs, OneVision's "drop the last layer" tower, its config section and its parameter tree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from hf_fixtures import hf_state, tiny_hf_config, tiny_hf_model
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import VISION_TOWERS, abstract_params
from llava_jax.weights import mapping

TOLERANCE = 1e-5


def relative_error(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _tower_params(hf_model, config):
  return mapping.hf_to_params(hf_state(hf_model).__getitem__, config)["vision_tower"]


def _run_tower(config, params, pixels_nchw):
  """Our tower on NCHW pixels: its selected hidden states and the intermediates it sows."""
  tower = VISION_TOWERS[config.vision.model_type](config, jnp.float32)
  selected, state = jax.jit(lambda p, x: tower.apply({"params": p}, x, mutable=["intermediates"]))(
      params, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)))
  return [np.asarray(h) for h in selected], {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}


@pytest.mark.parametrize("head", [True, False], ids=["pooling_head", "no_head"])
def test_every_hidden_state_and_the_pooled_output_equal_siglip_vision_model(head):
  hf_model = tiny_hf_model(vision="siglip", head=head, strategy="full", feature_layer=[0, 1, 2, 3])
  config = LlavaConfig.from_hf_dict(hf_model.config.to_dict())
  assert config.vision.class_tokens == 0 and config.vision.vision_use_head == head
  pixels = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    ref = hf_model.model.vision_tower(torch.tensor(pixels), output_hidden_states=True)
  assert isinstance(hf_model.model.vision_tower, transformers.SiglipVisionModel)
  selected, sown = _run_tower(config, _tower_params(hf_model, config), pixels)
  assert len(selected) == len(ref.hidden_states) == 4
  for ours, theirs in zip(selected, ref.hidden_states):
    assert ours.shape == (2, 16, 32)  # a 4x4 patch grid, no class token
    assert relative_error(ours, theirs.numpy()) < TOLERANCE
  assert relative_error(sown["last_hidden_state"], ref.last_hidden_state.numpy()) < TOLERANCE
  # LLaVA's last hidden state is the encoder's, before post_layernorm.
  assert relative_error(selected[-1], ref.last_hidden_state.numpy()) > 1e-2
  if head:
    assert sown["pooler_output"].shape == (2, 32)
    assert relative_error(sown["pooler_output"], ref.pooler_output.numpy()) < TOLERANCE
  else:
    assert ref.pooler_output is None and "pooler_output" not in sown


def test_onevision_tower_is_the_full_siglip_without_its_last_layer():
  """The released OneVision models take hidden state -1 of a tower with one layer fewer than SigLIP's (and no
  head), as LLaVA-NeXT's SigLipVisionTower deletes the last layer: that is the whole SigLIP's hidden state -2."""
  torch.manual_seed(0)
  full = transformers.SiglipVisionModel(tiny_hf_config(vision="siglip").vision_config).eval()
  hf_model = tiny_hf_model(vision="siglip", head=False, strategy="full", feature_layer=-1)
  hf_model.config.vision_config.num_hidden_layers = 2
  hf_model.model.vision_tower = transformers.SiglipVisionModel(hf_model.config.vision_config).eval()
  kept = {k: v for k, v in full.state_dict().items() if not k.startswith(("encoder.layers.2.", "head."))}
  hf_model.model.vision_tower.load_state_dict(kept, strict=True)
  config = LlavaConfig.from_hf_dict(hf_model.config.to_dict())
  assert (config.vision.num_hidden_layers, config.feature_layers) == (2, (2,))
  pixels = np.random.default_rng(1).standard_normal((2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    whole = full(torch.tensor(pixels), output_hidden_states=True).hidden_states
  (ours,), _ = _run_tower(config, _tower_params(hf_model, config), pixels)
  assert relative_error(ours, whole[-2].numpy()) < TOLERANCE
  assert relative_error(ours, whole[-1].numpy()) > 1e-2


def test_onevision_vision_config_reads_as_transformers_defines_it():
  """LlavaOnevisionConfig's SigLIP section (so400m at 384 px, patch 14, 26 layers, no head): 729 patches."""
  section = transformers.LlavaOnevisionConfig().vision_config.to_dict()
  d = tiny_hf_config(vision="siglip", strategy="full", feature_layer=-1).to_dict()
  d.update(vision_config=section, image_seq_length=729)
  config = LlavaConfig.from_hf_dict(d)
  v = config.vision
  assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1152, 4304, 26, 16)
  assert (v.image_size, v.patch_size, v.num_patches, v.class_tokens, v.vision_use_head) == (384, 14, 729, 0, False)
  assert (v.hidden_act, v.layer_norm_eps, config.tokens_per_tile) == ("gelu_pytorch_tanh", 1e-6, 729)
  assert config.to_hf_dict()["vision_config"] == section


def test_sparse_vision_config_takes_siglip_vision_config_defaults():
  d = tiny_hf_config(vision="siglip").to_dict()
  d["vision_config"] = {"model_type": "siglip_vision_model", "num_hidden_layers": 2}
  d["image_seq_length"] = (224 // 16) ** 2 - 1
  ours, theirs = LlavaConfig.from_hf_dict(d).vision, transformers.SiglipVisionConfig(num_hidden_layers=2)
  for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size", "layer_norm_eps", "hidden_act", "vision_use_head"):
    assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("head", [True, False], ids=["pooling_head", "no_head"])
def test_initialized_parameters_are_the_mapped_ones(head):
  """Llava(config).init creates exactly the tensors the mapping converts, at their shapes (a model trained from
  scratch exports to a complete HF folder)."""
  config = LlavaConfig.from_hf_dict(tiny_hf_config(vision="siglip", head=head).to_dict())
  shapes = {k: v.shape for k, v in flatten_dict(nn.unbox(abstract_params(config)), sep="/").items()}
  expected = {r.path: ((config.vision.num_hidden_layers if r.path.startswith("vision_tower/") else
                        config.text.num_hidden_layers),) * r.stacked + r.shape for r in mapping.rules(config)}
  assert shapes == expected
  assert any(p.startswith("vision_tower/head/") for p in expected) == head
