"""Tiny random transformers LLaVA models (float32, built in-process) used as the parity reference."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers

from llava_jax.config import LlavaConfig

VOCAB = 128
IMAGE_TOKEN = 127


LLAMA3_VOCAB = 128256  # Llama-3's 128K vocabulary
# Llama-3.1 rope scaling with a short original context, so that the 6 rotary frequencies of a 12-wide head fall
# into all three of its bands: kept (wavelength < 64/4), interpolated, divided by the factor (> 64/1).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _text_config(text: str, common: dict, rope_scaling, sliding_window):
  """The tiny text config of one decoder family."""
  if text == "llama":
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
      rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": rope_scaling}
    return transformers.LlamaConfig(num_key_value_heads=4, rope_parameters=rope, **common)
  if text == "mistral":
    return transformers.MistralConfig(
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=sliding_window, **common)
  if text == "qwen2":
    return transformers.Qwen2Config(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                    rms_norm_eps=1e-6, **common)
  if text == "llama3":
    return transformers.LlamaConfig(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                                    **dict(common, vocab_size=LLAMA3_VOCAB))
  if text == "yi":  # Yi-34B: LLaMA architecture, GQA and a large rope theta
    return transformers.LlamaConfig(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5e6},
                                    **common)
  raise ValueError(text)


def _vision_config(vision: str, image_size: int, patch_size: int, head: bool):
  """The tiny 3-layer vision config of one tower family ("clip" or "siglip", with or without its pooling head)."""
  common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                image_size=image_size, patch_size=patch_size)
  if vision == "clip":
    return transformers.CLIPVisionConfig(projection_dim=16, initializer_range=0.1, initializer_factor=3.0, **common)
  if vision == "siglip":
    return transformers.SiglipVisionConfig(vision_use_head=head, **common)
  raise ValueError(vision)


def tiny_hf_config(*, text="llama", vision="clip", head=True, projector_act="gelu", feature_layer=-2,
                   strategy="default", image_size=28, patch_size=7, tie=False, rope_scaling=None,
                   sliding_window=None) -> transformers.LlavaConfig:
  """A LLaVA config small enough to run in milliseconds but with every structural feature on.

  text="llama": Vicuna-style multi-head attention; text="mistral": grouped-query with rope_theta 1e6
  and, with `sliding_window`, attention to the last sliding_window tokens only; "qwen2": grouped-query
  with q/k/v biases; "llama3": grouped-query, 128K vocabulary, llama3 rope scaling; "yi": grouped-query,
  rope_theta 5e6. vision="clip": CLIP's tower (a class token); "siglip": SigLIP's (none), with its
  attention-pooling head where `head`.
  """
  vision_config = _vision_config(vision, image_size, patch_size, head)
  common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=tie, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
  text_config = _text_config(text, common, rope_scaling, sliding_window)
  # As transformers' processor counts: the patches, CLIP's class token, less the first token under "default".
  tokens = (image_size // patch_size) ** 2 + (1 if vision == "clip" else 0) - (1 if strategy == "default" else 0)
  return transformers.LlavaConfig(
      vision_config=vision_config, text_config=text_config, image_token_index=IMAGE_TOKEN, image_seq_length=tokens,
      projector_hidden_act=projector_act, vision_feature_layer=feature_layer,
      vision_feature_select_strategy=strategy, tie_word_embeddings=tie)


def tiny_hf_model(seed=0, **kwargs) -> transformers.LlavaForConditionalGeneration:
  torch.manual_seed(seed)
  return _perturbed(transformers.LlavaForConditionalGeneration(tiny_hf_config(**kwargs)).eval())


def text_with_images(rng, length: int, tokens_per_image: int, image_starts) -> np.ndarray:
  """One prompt row: BOS, then random text ids (avoiding pad/bos/eos and the image id) with one image's
  `tokens_per_image` image tokens starting at each of `image_starts`."""
  ids = rng.integers(3, IMAGE_TOKEN, length)
  ids[0] = 1
  for start in image_starts:
    ids[start:start + tokens_per_image] = IMAGE_TOKEN
  return ids


def our_config(hf_model) -> LlavaConfig:
  return LlavaConfig.from_hf_dict(hf_model.config.to_dict())


def hf_state(hf_model) -> dict[str, np.ndarray]:
  """The model's tensors under the names transformers writes to disk."""
  import tempfile, os
  from safetensors.numpy import load_file
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    return load_file(os.path.join(d, "model.safetensors"))


# LLaVA-NeXT: 28-px tiles of 4x4 patches and pinpoints of 1x2, 2x1, 2x2, 1x3 and 3x1 tiles.
NEXT_IMAGE_SIZE = 28
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
NEXT_PREPROCESSOR = {"size": {"shortest_edge": NEXT_IMAGE_SIZE},
                     "crop_size": {"height": NEXT_IMAGE_SIZE, "width": NEXT_IMAGE_SIZE},
                     "image_grid_pinpoints": NEXT_PINPOINTS}


def tiny_hf_next_config(*, text="llama", vision="clip", feature_layer=-2,
                        strategy="default") -> transformers.LlavaNextConfig:
  """A tiny LLaVA-NeXT config (2-layer vision tower of 28-px tiles, patch 7) over one of the tiny decoders."""
  base = tiny_hf_config(text=text, vision=vision, feature_layer=feature_layer, strategy=strategy,
                        image_size=NEXT_IMAGE_SIZE, patch_size=7)
  base.vision_config.num_hidden_layers = 2
  return transformers.LlavaNextConfig(
      vision_config=base.vision_config, text_config=base.text_config, image_token_index=IMAGE_TOKEN,
      image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=feature_layer,
      vision_feature_select_strategy=strategy, projector_hidden_act="gelu", tie_word_embeddings=False)


def _perturbed(model):
  # Norm weights and biases start at 1/0; perturb them so a mapping mistake cannot hide.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "layrnorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def tiny_hf_next_model(seed=0, **kwargs) -> transformers.LlavaNextForConditionalGeneration:
  torch.manual_seed(seed)
  return _perturbed(transformers.LlavaNextForConditionalGeneration(tiny_hf_next_config(**kwargs)).eval())


def next_image_processor():
  """transformers' PIL LLaVA-NeXT image processor of the tiny NeXT models."""
  from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
  return LlavaNextImageProcessorPil(**NEXT_PREPROCESSOR)


# The LLaVA-1.5-hf chat template's shape: role, image lines, then the text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def save_tiny_hf_folder(folder, seed=3):
  """A complete tiny HF LLaVA folder (weights, tokenizer, 28-pixel image processor, chat template)."""
  from llava_jax.data.images import ImageProcessor
  from tokenizer_fixture import build_tiny_tokenizer
  model = tiny_hf_model(seed=seed)
  model.generation_config.eos_token_id = 2
  model.save_pretrained(folder)
  build_tiny_tokenizer(folder)
  ImageProcessor.default(28).save(folder)
  (folder / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
  return folder


def assert_hf_round_trip_bit_for_bit(tmp_path, hf_model, expected_config: LlavaConfig) -> None:
  """hf_model saved, read as ours (its config must be `expected_config`) and written back: transformers loads the
  result with no missing or unexpected keys, every tensor and config.json equal to the original's."""
  from llava_jax.config import load_config
  from llava_jax.weights.hf import read_hf_llava, write_hf_llava
  hf_model.save_pretrained(tmp_path / "hf")
  config, params, source = read_hf_llava(str(tmp_path / "hf"))
  assert config == expected_config and load_config(str(tmp_path / "hf")) == config
  (tmp_path / "out").mkdir()
  write_hf_llava(str(tmp_path / "out"), config, params, source)
  reloaded, info = type(hf_model).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  theirs, ours = hf_model.state_dict(), reloaded.state_dict()
  assert sorted(ours) == sorted(theirs)
  for name, tensor in ours.items():
    assert torch.equal(tensor, theirs[name]), name
  read = lambda folder: json.loads((tmp_path / folder / "config.json").read_text())
  assert read("out") == read("hf")
